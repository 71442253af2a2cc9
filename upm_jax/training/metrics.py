"""Scalar metrics to a JSON-lines file and TensorBoard event files, from process 0 only."""
import json
import logging
import math
import os

import jax


class MetricsWriter:
    """Appends `{"step": s, name: value, ...}` lines to DIR/metrics.jsonl and writes the
    same scalars as TensorBoard events under DIR/tensorboard (when TensorFlow is present).

    On every process but 0 all methods do nothing, so callers need no guards.
    """

    def __init__(self, workdir):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            import tensorflow as tf  # Optional: only for the event files.
        except ImportError:
            logging.warning("TensorFlow is not installed: no TensorBoard event files.")
        else:
            self._tf = tf
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step, scalars):
        """Writes one step's flat dict of scalars (floats, NaN/inf written as strings)."""
        if not self._active:
            return
        record = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else str(value)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            with self._tb.as_default():
                for name, value in scalars.items():
                    self._tf.summary.scalar(name, float(value), step=int(step))
            self._tb.flush()

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
