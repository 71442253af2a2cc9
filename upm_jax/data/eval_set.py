"""The test frames of a split as the workdir records them, so extraction on another machine
needs only the test frames (not the training frames, not the reader's full-set checks).

`DIR/split_K/test_set.npz` holds the test FrameTable with paths relative to the dataset
root, and the query / gallery tracklets; reading it joins the paths onto the root given now.
"""
import dataclasses
import os

import numpy as np

from upm_jax.data import FrameTable
from upm_jax.evaluation.features import atomic_write
from upm_jax.experiment import ConfigError

FILE = "test_set.npz"
_TABLE_FIELDS = ("tracklet", "frame", "tracklet_camera", "tracklet_pid", "tracklet_index")


@dataclasses.dataclass(frozen=True)
class TestSet:
    """What extraction and evaluation need of a split: its test table, query and gallery."""
    test: FrameTable
    query: np.ndarray
    gallery: np.ndarray
    layout: str
    directions: str    # "one": query -> gallery; "both": the mean with gallery -> query


def path_of(split_dir):
    return os.path.join(split_dir, FILE)


def write(split_dir, dataset, root):
    """Records `dataset`'s test side in `split_dir`, paths relative to `root`."""
    test = dataset.test
    relative = np.asarray([os.path.relpath(p, root) for p in test.path])
    arrays = {name: getattr(test, name) for name in _TABLE_FIELDS}
    arrays.update(path=relative, num_cameras=np.asarray(test.num_cameras),
                  query=np.asarray(dataset.query), gallery=np.asarray(dataset.gallery),
                  layout=np.asarray(dataset.layout), directions=np.asarray(dataset.directions))
    os.makedirs(split_dir, exist_ok=True)
    atomic_write(path_of(split_dir), lambda f: np.savez(f, **arrays))


def read(split_dir, root):
    """The recorded test set of `split_dir` with its frames under `root` (checked to exist)."""
    with np.load(path_of(split_dir), allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    paths = np.asarray([os.path.join(root, p) for p in arrays["path"]])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ConfigError(
            f"{len(missing)} of the {len(paths)} test frames recorded in "
            f"{path_of(split_dir)} are missing under config.data.root={root!r}, e.g. "
            f"{missing[0]}; point --config.data.root at the dataset folder on this machine")
    table = FrameTable(path=paths, num_cameras=int(arrays["num_cameras"]),
                       **{name: arrays[name] for name in _TABLE_FIELDS})
    return TestSet(test=table, query=arrays["query"], gallery=arrays["gallery"],
                   layout=str(arrays["layout"]), directions=str(arrays["directions"]))
