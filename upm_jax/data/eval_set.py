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
from upm_jax.files import atomic_write

_TABLE_FIELDS = ("tracklet", "frame", "tracklet_camera", "tracklet_pid", "tracklet_index")


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
    files of `tree`: the disk, or a prepared set's record of the release folder)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    paths = np.asarray([os.path.join(root, p) for p in arrays["path"]])
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
