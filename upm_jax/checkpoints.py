"""Checkpoints of the whole TrainState with orbax, and partial restores for extraction.

Orbax writes each step into a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact; the leftover temporary folder is
removed the next time a manager opens the directory. Saves are asynchronous: `save`
returns once the state is copied off the devices and the files are written by a
background thread while training goes on; the next save, `wait` and `close` wait for it
(and report its failure, naming its step).

Integrity: neither orbax nor TensorStore checksums the arrays' bytes (zarr3's crc32c
covers only shard indices; OCDBT none), so a flipped bit would restore silently. Just
before the commit (the rename) the primary process records the SHA-256 and size of every
file of the step in `<step>/default/checksums.json`; every restore first compares each
file with it and names the damaged one. A checkpoint without that file (written before
it existed) is restored unverified, with a warning.

Before any restore the checkpoint's recorded shapes are compared with the model's, so a
checkpoint of another model is one clear error instead of an orbax traceback.

Several processes: each calls the same methods; orbax writes every array's shards from the
process that holds them and process 0 writes the metadata, the checksums and commits.
"""
import errno
import hashlib
import json
import os
import warnings

import jax
import orbax.checkpoint as ocp

from upm_jax.files import atomic_write

# What extraction needs from a TrainState: inference weights, nothing else.
INFERENCE_FIELDS = ("ema_params", "frozen_params", "batch_stats")


# The checksums of a step's files, in its item folder (<step>/default/).
CHECKSUMS = "checksums.json"
_ITEM = "default"
_HASH_BLOCK = 4 << 20


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used as asked."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint written without checksums (by an earlier version) is restored as is."""


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _files(directory):
    """Paths relative to `directory` of every file under it (the checksums file excepted)."""
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), directory)
            if relative != CHECKSUMS:
                out.append(relative)
    return sorted(out)


def _digest(files):
    """SHA-256 of the canonical JSON of a checksums entry (so the file checks itself)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_checksums(directory):
    """Records the SHA-256 and size of every file under `directory` in its CHECKSUMS file."""
    directory = os.fspath(directory)
    files = {name: {"size": os.path.getsize(os.path.join(directory, name)),
                    "sha256": _sha256(os.path.join(directory, name))}
             for name in _files(directory)}
    text = json.dumps({"algorithm": "sha256", "files": files, "files_sha256": _digest(files)},
                      indent=1, sort_keys=True)
    atomic_write(os.path.join(directory, CHECKSUMS), lambda f: f.write(text), mode="w")


def verify_checksums(directory, *, label=None):
    """Compares every file recorded in `directory`'s CHECKSUMS with its bytes.

    Returns True when all match, False when there is no CHECKSUMS file; raises
    CheckpointError naming the first missing, resized or changed file (as
    `label/<relative path>`, `label` defaulting to `directory`).
    """
    label = directory if label is None else label
    path = os.path.join(directory, CHECKSUMS)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        recorded = manifest["files"]
        if _digest(recorded) != manifest["files_sha256"]:
            raise ValueError("its own checksum does not match")
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in recorded.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{label}/{CHECKSUMS} is damaged ({e})") from None
    for name, size, digest in entries:
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{label}/{name} is missing")
        if os.path.getsize(file) != size:
            raise CheckpointError(f"{label}/{name} has {os.path.getsize(file)} bytes, {size} "
                                  "were written")
        if _sha256(file) != digest:
            raise CheckpointError(f"{label}/{name} is damaged (its SHA-256 differs from the "
                                  "one recorded when it was written)")
    return True


class _ChecksummedPyTreeHandler(ocp.PyTreeCheckpointHandler):
    """orbax's PyTree handler that records CHECKSUMS after finalising the item folder.

    orbax calls `finalize` on the primary process only, once every process has written
    its files and before the step's folder is renamed into place, so the checksums are
    committed atomically with the checkpoint they describe."""

    def finalize(self, directory):
        super().finalize(directory)
        write_checksums(directory)


# orbax finds an item's handler from the class of its arguments: these name the one above.
@ocp.args.register_with_handler(_ChecksummedPyTreeHandler, for_save=True)
class _Save(ocp.args.PyTreeSave):
    pass


@ocp.args.register_with_handler(_ChecksummedPyTreeHandler, for_restore=True)
class _Restore(ocp.args.PyTreeRestore):
    pass


def _restore_args(abstract):
    return _Restore(
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
            enable_async_checkpointing=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0))
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=_ChecksummedPyTreeHandler())
        self._pending = None   # (step, the step intact before it) of a save in flight

    def latest_step(self):
        """The newest committed checkpoint's step, or None (waits for a save in flight)."""
        self.wait()
        return self._manager.latest_step()

    def save(self, step, state):
        """Starts saving `state` at `step`, after waiting for the previous save.

        Returns once the state is copied off the devices (the next training step may then
        overwrite it); the files are written and committed in the background. A failed
        write (e.g. a full disk) raises CheckpointError naming its step, here or at the
        next `save`, `wait` or `close`; orbax only renames a complete checkpoint into
        place, so the previous one stays intact.
        """
        if self._read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        previous = self.latest_step()
        self._pending = (int(step), previous)
        try:
            self._manager.save(int(step), args=_Save(state), force=True)
        except Exception as e:  # orbax raises from its writer threads with OSError inside
            self._pending = None
            self._raise_write_error(e, step, previous)

    def wait(self):
        """Blocks until a save in flight is committed (CheckpointError if it failed)."""
        if self._pending is None:
            return
        step, previous = self._pending
        self._pending = None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._raise_write_error(e, step, previous)

    def _raise_write_error(self, error, step, previous):
        cause = _os_error(error)
        if cause is None:
            raise error
        kept = (f"the checkpoint of step {previous} is intact" if previous is not None
                else "no earlier checkpoint exists")
        reason = cause.strerror or os.strerror(cause.errno or errno.EIO)
        raise CheckpointError(
            f"could not write the checkpoint of step {step} to {self.directory}: {reason};"
            f" {kept}. Free space (or fix the folder) and run again to resume") from None

    def restore(self, abstract_state, step=None):
        """Restores a whole TrainState into `abstract_state` (shapes, dtypes, shardings),
        after verifying the checkpoint's files."""
        step = self._step(step)
        self.verify(step)
        self.check_fits(abstract_state, step)
        return self._orbax_restore(step, _restore_args(abstract_state))

    def restore_inference(self, target, step=None):
        """Restores only the TrainState fields named in `target` (a dict of abstract trees,
        normally the INFERENCE_FIELDS) and returns them as a dict, after verifying the
        checkpoint's files."""
        step = self._step(step)
        self.verify(step)
        self.check_fits(target, step, partial=True)
        args = _restore_args(target)
        return self._orbax_restore(step, _Restore(
            item=args.item, restore_args=args.restore_args, partial_restore=True))

    def verify(self, step):
        """Raises CheckpointError naming the file when the checkpoint of `step` is not the
        one written (see the module docstring); warns when it carries no checksums."""
        folder = os.path.join(self.directory, str(step))
        try:
            verified = verify_checksums(os.path.join(folder, _ITEM), label=_ITEM)
        except CheckpointError as e:
            raise CheckpointError(f"the checkpoint {folder} is damaged: {e}. "
                                  f"{self._advice(step)}") from None
        if not verified:
            warnings.warn(f"{folder} has no {CHECKSUMS} (written by an earlier version): "
                          "restoring it unverified", UnverifiedCheckpointWarning, stacklevel=3)

    def _advice(self, step):
        older = [s for s in self._manager.all_steps() if s < step]
        if older:
            return (f"Restore it from a copy, or delete that folder to use the checkpoint of "
                    f"step {max(older)}")
        return "Restore it from a copy, or delete that folder to train from the start"

    def _orbax_restore(self, step, args):
        try:
            return self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"cannot restore the checkpoint {self.directory}/{step} ({first}). "
                f"{self._advice(step)}") from None

    def check_fits(self, abstract, step, *, partial=False):
        """Raises CheckpointError naming the first differing arrays when the checkpoint at
        `step` was written by another model than `abstract` describes."""
        try:
            saved = _leaf_shapes(self._manager.item_metadata(step).tree)
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise CheckpointError(f"cannot read the metadata of the checkpoint "
                                  f"{self.directory}/{step} ({type(e).__name__}: {e}). "
                                  f"{self._advice(step)}") from None
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
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        return step

    def close(self):
        """Waits for a save in flight, then releases orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, for restoring into."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
