"""A split's evaluation set as the workdir records it (`DIR/split_K/test_set.npz`), so
extraction on another machine needs only the test frames (not the training frames, not
the reader's full-set checks).

The file holds the test FrameTable with paths relative to the dataset root, and the query
and gallery tracklets; reading it joins the paths onto the root given now, whose frames
are checked in the release folder's tree (the disk, or a prepared set's record of it).
"""
import dataclasses
import os

import numpy as np

from upm_jax.data.table import DatasetError, FrameTable
from upm_jax.data.tree import LOCAL
from upm_jax.files import DamagedFileError, atomic_write, verify_npz

_TABLE_FIELDS = ("tracklet", "frame", "tracklet_camera", "tracklet_pid", "tracklet_index")
_FRAME_FIELDS = ("path", "tracklet", "frame")                          # one entry per frame
_TRACKLET_FIELDS = ("tracklet_camera", "tracklet_pid", "tracklet_index")  # one per tracklet
_SCALAR_FIELDS = ("num_cameras", "layout", "directions")
# What to do about a damaged or foreign test set file.
_REWRITE = ("record it again from the dataset with --mode train on this workdir (finished "
            "models are not retrained)")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """What extraction and evaluation need of a split: its test table, query and gallery."""
    test: FrameTable
    query: np.ndarray
    gallery: np.ndarray
    layout: str
    directions: str    # "one": query -> gallery; "both": the mean with gallery -> query


def write(path, dataset, root):
    """Records `dataset`'s test side in the file `path`, frame paths relative to `root`."""
    test = dataset.test
    relative = np.asarray([os.path.relpath(p, root) for p in test.path])
    arrays = {name: getattr(test, name) for name in _TABLE_FIELDS}
    arrays.update(path=relative, num_cameras=np.asarray(test.num_cameras),
                  query=np.asarray(dataset.query), gallery=np.asarray(dataset.gallery),
                  layout=np.asarray(dataset.layout), directions=np.asarray(dataset.directions))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read(path, root, tree=LOCAL):
    """The evaluation set recorded in `path` with its frames under `root` (checked to be
    files of `tree`: the disk, or a prepared set's record of the release folder).

    The file is verified first (CRC-32 of every member) and its arrays checked against each
    other, so a damaged or shortened file is an error naming it, never a wrong test set.
    """
    arrays = _read_arrays(path)
    paths = np.asarray([os.path.join(root, str(p)) for p in arrays["path"]])
    missing = [p for p in paths if not tree.isfile(p)]
    if missing:
        where, fix = ((f"under config.data.root={root!r}",
                       "point --config.data.root at the dataset folder on this machine")
                      if tree.origin is None else
                      (f"from the release folder that the prepared set {tree.origin} records "
                       f"at {root!r}", "was the workdir trained on another copy of the dataset? "
                       "read the set prepared from that copy"))
        raise DatasetError(f"{len(missing)} of the {len(paths)} test frames recorded in {path} "
                           f"are missing {where}, e.g. {missing[0]}; {fix}")
    table = FrameTable(path=paths, num_cameras=int(arrays["num_cameras"]),
                       **{name: arrays[name] for name in _TABLE_FIELDS})
    return EvalSet(test=table, query=arrays["query"], gallery=arrays["gallery"],
                   layout=str(arrays["layout"]), directions=str(arrays["directions"]))


def _read_arrays(path):
    """The arrays of the test set file `path`, verified and checked for consistency."""
    try:
        verify_npz(path, advice=_REWRITE)
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except DamagedFileError as e:
        raise DatasetError(str(e)) from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read the recorded test set ({e}); {_REWRITE}") from None
    expected = _FRAME_FIELDS + _TRACKLET_FIELDS + _SCALAR_FIELDS + ("query", "gallery")
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise DatasetError(f"{path}: not a recorded test set (no {', '.join(missing)}); "
                           f"{_REWRITE}")

    def fail(problem):
        raise DatasetError(f"{path}: {problem}; the file is damaged or not written by this "
                           f"version, {_REWRITE}")

    if any(arrays[name].ndim for name in _SCALAR_FIELDS):
        fail("'num_cameras', 'layout' and 'directions' must be single values")
    if arrays["path"].dtype.kind != "U":
        fail(f"'path' holds {arrays['path'].dtype} values, not frame paths")
    integer = _FRAME_FIELDS[1:] + _TRACKLET_FIELDS + ("query", "gallery", "num_cameras")
    for name in integer:
        if arrays[name].dtype.kind not in "iu" or (name != "num_cameras"
                                                 and arrays[name].ndim != 1):
            fail(f"'{name}' must be a 1-D integer array, got {arrays[name].dtype} of shape "
                 f"{arrays[name].shape}")
    frames = {name: len(arrays[name]) for name in _FRAME_FIELDS}
    tracklets = {name: len(arrays[name]) for name in _TRACKLET_FIELDS}
    if len(set(frames.values())) != 1:
        fail(f"the per-frame arrays differ in length ({frames})")
    if len(set(tracklets.values())) != 1:
        fail(f"the per-tracklet arrays differ in length ({tracklets})")
    num_tracklets = tracklets["tracklet_pid"]
    for name in ("tracklet", "query", "gallery"):
        values = arrays[name]
        if values.size and (values.min() < 0 or values.max() >= num_tracklets):
            fail(f"'{name}' holds tracklet indices outside [0, {num_tracklets})")
    return arrays
