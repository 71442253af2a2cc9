"""Checkpoints of the whole TrainState with orbax, and partial restores for extraction.

Orbax writes each step into a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact; the leftover temporary folder is
removed the next time a manager opens the directory.

Several processes: each calls the same methods; orbax writes every array's shards from the
process that holds them and process 0 writes the metadata and commits the step. `wait`
returns on every process only once the step is committed, so any process may then read it.
"""
import os

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# What extraction needs from a TrainState: inference weights, nothing else.
INFERENCE_FIELDS = ("ema_params", "frozen_params", "batch_stats")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used as asked."""


def _restore_args(abstract):
    return ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class Checkpoints:
    """The checkpoints of one training run: `DIR/checkpoints/<step>/`."""

    def __init__(self, workdir, *, keep=3, read_only=False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(
                f"no checkpoints in {self.directory}: train first (--mode train or all)")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only,
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0))
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step, state):
        """Starts an asynchronous save of `state` at `step` (waits for the previous one)."""
        self._manager.save(int(step), args=ocp.args.PyTreeSave(state), force=True)

    def restore(self, abstract_state, step=None):
        """Restores a whole TrainState into `abstract_state` (shapes, dtypes, shardings)."""
        step = self._step(step)
        return self._manager.restore(step, args=_restore_args(abstract_state))

    def restore_inference(self, target, step=None):
        """Restores only the TrainState fields named in `target` (a dict of abstract trees,
        normally the INFERENCE_FIELDS) and returns them as a dict."""
        step = self._step(step)
        args = _restore_args(target)
        return self._manager.restore(
            step, args=ocp.args.PyTreeRestore(
                item=args.item, restore_args=args.restore_args, partial_restore=True))

    def _step(self, step):
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        return step

    def wait(self):
        """Waits for the pending save; with several processes, until every one is past it
        (process 0 commits the step last, and others read it next, e.g. for extraction)."""
        self._manager.wait_until_finished()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints committed")

    def close(self):
        self._manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, for restoring into."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
