"""Checkpoints of the whole TrainState with orbax, and partial restores for extraction.

Orbax writes each step into a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact; the leftover temporary folder is
removed the next time a manager opens the directory. Before any restore the checkpoint's
recorded shapes are compared with the model's, so a checkpoint of another model is one
clear error instead of an orbax traceback.

Several processes: each calls the same methods; orbax writes every array's shards from the
process that holds them and process 0 writes the metadata and commits the step.
"""
import errno
import os

import jax
import orbax.checkpoint as ocp

# What extraction needs from a TrainState: inference weights, nothing else.
INFERENCE_FIELDS = ("ema_params", "frozen_params", "batch_stats")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used as asked."""


def _restore_args(abstract):
    return ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def _os_error(error):
    """The OSError behind `error` (orbax wraps them), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _leaf_shapes(tree):
    """{'a/b/c': (shape, dtype)} of the array leaves of a pytree (arrays or metadata)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                        for k in path)
        out[name] = (tuple(leaf.shape), str(leaf.dtype))
    return out


def latest_saved_step(directory):
    """The newest complete checkpoint step in `directory`, or None, from the folder names
    alone (orbax renames a step's folder to its number only once complete).
    Unlike `Checkpoints`, it runs no collective, so in a multi-process run any process may
    ask at any time, whatever the others are doing."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    steps = [int(name) for name in names if name.isdigit()]
    return max(steps) if steps else None


class Checkpoints:
    """The checkpoints of one training run: `directory/<step>/`."""

    def __init__(self, directory, *, keep=3, read_only=False):
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(
                f"no checkpoints in {self.directory}: train first (--mode train or all)")
        # read_only is not passed to orbax: it only logs warnings; this object never saves.
        self._read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0))
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=ocp.PyTreeCheckpointHandler())

    def latest_step(self):
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step, state):
        """Saves `state` at `step` and waits until it is on disk.

        A failed write (e.g. a full disk) raises CheckpointError at this step; orbax only
        renames a complete checkpoint into place, so the previous one stays intact.
        """
        if self._read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        previous = self.latest_step()
        try:
            self._manager.save(int(step), args=ocp.args.PyTreeSave(state), force=True)
            self._manager.wait_until_finished()
        except Exception as e:  # orbax raises from its writer threads with OSError inside
            cause = _os_error(e)
            if cause is None:
                raise
            kept = (f"the checkpoint of step {previous} is intact" if previous is not None
                    else "no earlier checkpoint exists")
            reason = cause.strerror or os.strerror(cause.errno or errno.EIO)
            raise CheckpointError(
                f"could not write the checkpoint of step {step} to {self.directory}: {reason};"
                f" {kept}. Free space (or fix the folder) and run again to resume") from None

    def restore(self, abstract_state, step=None):
        """Restores a whole TrainState into `abstract_state` (shapes, dtypes, shardings)."""
        step = self._step(step)
        self.check_fits(abstract_state, step)
        return self._manager.restore(step, args=_restore_args(abstract_state))

    def restore_inference(self, target, step=None):
        """Restores only the TrainState fields named in `target` (a dict of abstract trees,
        normally the INFERENCE_FIELDS) and returns them as a dict."""
        step = self._step(step)
        self.check_fits(target, step, partial=True)
        args = _restore_args(target)
        return self._manager.restore(
            step, args=ocp.args.PyTreeRestore(
                item=args.item, restore_args=args.restore_args, partial_restore=True))

    def check_fits(self, abstract, step, *, partial=False):
        """Raises CheckpointError naming the first differing arrays when the checkpoint at
        `step` was written by another model than `abstract` describes."""
        saved = _leaf_shapes(self._manager.item_metadata(step).tree)
        wanted = _leaf_shapes(abstract)
        if partial:
            fields = {name.split("/")[0] for name in wanted}
            saved = {k: v for k, v in saved.items() if k.split("/")[0] in fields}
        missing = sorted(set(wanted) - set(saved))
        extra = sorted(set(saved) - set(wanted))
        shaped = sorted(k for k in set(wanted) & set(saved) if wanted[k][0] != saved[k][0])
        if not (missing or extra or shaped):
            return
        lines = [f"the checkpoint {self.directory}/{step} was written by a different model "
                 f"than the config describes ({len(shaped)} arrays of another shape, "
                 f"{len(missing)} missing, {len(extra)} unexpected), e.g.:"]
        lines += [f"  {k}: {saved[k][0]} in the checkpoint, {wanted[k][0]} for the config"
                  for k in shaped[:3]]
        lines += [f"  {k}: not in the checkpoint" for k in missing[:3]]
        lines += [f"  {k}: only in the checkpoint" for k in extra[:3]]
        lines.append("Use the config this workdir was trained with (its config.json), or "
                     "another --workdir for the new model")
        raise CheckpointError("\n".join(lines))

    def _step(self, step):
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        return step

    def close(self):
        self._manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, for restoring into."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
