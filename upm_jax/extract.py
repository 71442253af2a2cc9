"""Feature extraction: batched, sharded over every device, every test frame exactly once.

Writes the features file the evaluator reads (`upm_jax.evaluation` format) and, on
request, the `.mat` files the original MATLAB scripts load.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.io
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from upm_jax import data as data_lib
from upm_jax import evaluation
from upm_jax import train as train_lib

# scipy writes MATLAB v5 files, whose variables must stay under 2 GiB; the original MARS
# script reads its test features from two files (test0.mat, test1.mat) for that reason.
_MAT_LIMIT_BYTES = 2**31 - 1


def inference_variables(restored):
    """Flax variables from a checkpoint's EMA params, frozen params and batch_stats."""
    return {"params": train_lib.merge_params(restored["ema_params"], restored["frozen_params"]),
            "batch_stats": restored["batch_stats"]}


def make_feature_fn(model, mesh):
    """A jitted `(variables, uint8 images [B,H,W,3]) -> float32 features [B, P, D]`."""
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    def features(variables, images):
        images = images.astype(jnp.float32) / 127.5 - 1.0
        return model.apply(variables, images, train=False).astype(jnp.float32)

    return jax.jit(features, out_shardings=batch_sharding)


def extract_frame_features(model, variables, table, *, mesh, batch_size, image_size, out=None):
    """Features of every frame of `table` in table order: float32 [N, P, D] on every process.

    `out`: an array to fill (e.g. an `np.lib.format.open_memmap` for sets too large for
    memory); by default a new one. Each process decodes only the rows of each global batch
    its devices hold; the device work of batch i overlaps the decoding of batch i + 1
    (results are fetched one batch late).
    """
    if batch_size % mesh.size:
        raise ValueError(f"eval.batch_size={batch_size} must be divisible by the "
                         f"{mesh.size} devices in use")
    feature_fn = make_feature_fn(model, mesh)
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    num_frames = table.num_frames
    pending = None

    def collect(out, pending):
        feats, start = pending
        feats = np.asarray(multihost_utils.process_allgather(feats, tiled=True))  # [B, P, D]
        stop = min(start + batch_size, num_frames)
        if out is None:
            out = np.zeros((num_frames,) + feats.shape[1:], np.float32)
        out[start:stop] = feats[:stop - start]
        return out

    batches = data_lib.test_batches(table, batch_size=batch_size, image_size=image_size,
                                    sharding=sharding)
    for start, batch in zip(range(0, num_frames, batch_size), batches):
        images = jax.make_array_from_process_local_data(
            sharding, batch["image"], (batch_size,) + batch["image"].shape[1:])
        feats = feature_fn(variables, images)
        if pending is not None:
            out = collect(out, pending)
        pending = (feats, start)
    if pending is not None:
        out = collect(out, pending)
    return out


def features_arrays(frame_feat, dataset, *, pooling, frame_level=True):
    """The evaluator's arrays for the test set: frame-level, or pooled per tracklet here."""
    test = dataset.test
    arrays = dict(
        pid=test.tracklet_pid.astype(np.int64),
        cam=test.tracklet_camera.astype(np.int64) + 1,
        query=np.asarray(dataset.query, np.int64),
        gallery=np.asarray(dataset.gallery, np.int64),
        pooling=np.asarray(pooling))
    if frame_level:
        arrays.update(frame_feat=frame_feat, frame_track=test.tracklet.astype(np.int64))
    else:
        pooled = evaluation.pool_tracklets(frame_feat, test.tracklet, test.num_tracklets,
                                           pooling=pooling)  # [T, P*D], unit rows
        arrays.update(track_feat=pooled.reshape(test.num_tracklets, *frame_feat.shape[1:]))
    return arrays


def write_features(path, arrays):
    """Writes the features file atomically (validated by the evaluator's writer)."""
    if jax.process_index() == 0:
        evaluation.save_features(path, **arrays)


def write_mat(directory, frame_feat, dataset, layout):
    """The original MATLAB scripts' inputs: `test.mat` ([D, N], one column per frame, the
    parts flattened) with per-frame `testID.mat` / `testCAM.mat`; MARS reads `test0.mat`
    and `test1.mat` (the frames split in two halves)."""
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    test = dataset.test
    feats = frame_feat.reshape(len(frame_feat), -1).T  # [P*D, N]
    if layout == "mars" or feats.nbytes > _MAT_LIMIT_BYTES:
        half = feats.shape[1] // 2
        files = {"test0.mat": ("test", feats[:, :half]), "test1.mat": ("test", feats[:, half:])}
    else:
        files = {"test.mat": ("test", feats)}
    files["testID.mat"] = ("testID", test.pid.astype(np.float64)[:, None])
    files["testCAM.mat"] = ("testCAM", (test.camera.astype(np.float64) + 1)[:, None])
    for name, (variable, value) in files.items():
        _atomic_savemat(os.path.join(directory, name), {variable: np.ascontiguousarray(value)})


def _atomic_savemat(path, variables):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        scipy.io.savemat(f, variables, do_compression=False)
    os.replace(tmp, path)
