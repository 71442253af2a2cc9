"""Scalar metrics of a training run: a JSON-lines file and TensorBoard event files
(through tensorboardX, which needs no TensorFlow), from process 0 only.

Rows are written as steps are logged, before the checkpoint that covers them; a run that
resumes from the checkpoint of step S logs the steps after S again, so on opening the
rows after S are dropped from the JSON-lines file (and TensorBoard is told to purge its
events from S + 1 on): every step appears once, with the values of the run that kept it.
"""
import json
import math
import os

import jax
from tensorboardX import SummaryWriter

from upm_jax.files import atomic_write


class MetricsWriter:
    """Appends `{"step": s, name: value, ...}` lines to `jsonl_path` and writes the same
    scalars as TensorBoard events under `tensorboard_dir`.

    `resume_step`: the step training continues from (0 for a new run); rows of later
    steps, and a last line cut short by a killed run, are dropped first. On every process
    but 0 all methods do nothing, so callers need no guards.
    """

    def __init__(self, jsonl_path, tensorboard_dir, *, resume_step=0):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self._active:
            return
        os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
        truncate_rows(jsonl_path, resume_step)
        self._jsonl = open(jsonl_path, "a", encoding="utf-8")
        self._tb = SummaryWriter(tensorboard_dir, flush_secs=30, purge_step=resume_step + 1)

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


def truncate_rows(jsonl_path, last_step):
    """Rewrites `jsonl_path` (atomically) without the rows of steps after `last_step` and
    without lines that are not complete JSON rows; leaves it alone when nothing goes."""
    if not os.path.isfile(jsonl_path):
        return
    with open(jsonl_path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if step <= last_step and line.endswith("\n"):
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write(jsonl_path, lambda f: f.writelines(kept), mode="w")
