"""Scalar metrics of a training run: a JSON-lines file and TensorBoard event files
(through tensorboardX, which needs no TensorFlow), from process 0 only."""
import json
import math
import os

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
    """Appends `{"step": s, name: value, ...}` lines to `jsonl_path` and writes the same
    scalars as TensorBoard events under `tensorboard_dir`.

    On every process but 0 all methods do nothing, so callers need no guards.
    """

    def __init__(self, jsonl_path, tensorboard_dir):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self._active:
            return
        os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
        self._jsonl = open(jsonl_path, "a", encoding="utf-8")
        self._tb = SummaryWriter(tensorboard_dir, flush_secs=30)

    def write(self, step, scalars):
        """Writes one step's flat dict of scalars (floats, NaN/inf written as strings)."""
        if not self._active:
            return
        record = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else str(value)
            self._tb.add_scalar(name, value, global_step=int(step))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
            self._tb.close()
