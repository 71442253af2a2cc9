"""Where a checkpoint is restored for extraction and the features files are written.

A trained model is restored from its checkpoint alone (the EMA params, frozen params and
BatchNorm statistics: no ImageNet file, no training frames) and run batched and sharded
over every device, each test frame exactly once. Each batch's features are streamed into
the features file the evaluator reads (`upm_jax.evaluation` format) as it is extracted,
so memory does not grow with the test set (MARS: 681,089 frames); the montage paths file
is written next to it, and on request the `.mat` files the original MATLAB scripts load.
"""
import functools
import itertools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.io
import tqdm
from jax.experimental import multihost_utils

from upm_jax import checkpoints as checkpoints_lib
from upm_jax import config as config_lib
from upm_jax import data as data_lib
from upm_jax import evaluation
from upm_jax import methods
from upm_jax import parallel
from upm_jax import workdir as workdir_lib
from upm_jax.files import atomic_write
from upm_jax.progress import say
from upm_jax.training import state as state_lib

# scipy writes MATLAB v5 files, whose variables must stay under 2 GiB; the original MARS
# script reads its test features from two files (test0.mat, test1.mat) for that reason.
_MAT_LIMIT_BYTES = 2**31 - 1
# Frames (evenly spaced) whose spread is measured for the degenerate-features warning.
_SPREAD_FRAMES = 65536
# Extraction batch on accelerators when config.eval.batch_size is 0.
ACCELERATOR_EXTRACTION_BATCH = 256


def extraction_batch(config, mesh):
    """The global extraction batch: config.eval.batch_size, or for 0 one frame per device
    on CPU (fastest there) and 256 frames on accelerators, by the mesh's devices."""
    if config.eval.batch_size:
        return config.eval.batch_size
    if mesh.devices.flat[0].platform == "cpu":
        return mesh.size
    return max(ACCELERATOR_EXTRACTION_BATCH // mesh.size, 1) * mesh.size


def restore_inference(config, model_dir, mesh, step=None):
    """(model, variables) of the model trained in `model_dir` (a workdir.ModelDir) under
    the workdir's `config`: the EMA params, frozen params and BatchNorm statistics of its
    checkpoint `step` (None: the latest), replicated on `mesh`, ready for
    `model.apply(variables, x)`."""
    model = methods.build_model(config, model_dir.head)
    abstract = state_lib.abstract_variables(model, image_shape=methods.image_shape(config),
                                            mesh=mesh)
    trained, frozen = state_lib.split_frozen(abstract["params"], model.frozen_scopes)
    target = {"ema_params": trained, "frozen_params": frozen,
              "batch_stats": abstract.get("batch_stats", {})}
    checkpoints = checkpoints_lib.Checkpoints(model_dir.checkpoints, read_only=True)
    try:
        restored = checkpoints.restore_inference(target, step)
    finally:
        checkpoints.close()
    return model, inference_variables(restored)


def inference_variables(restored):
    """Flax variables from a checkpoint's EMA params, frozen params and batch_stats."""
    return {"params": state_lib.merge_params(restored["ema_params"], restored["frozen_params"]),
            "batch_stats": restored["batch_stats"]}


def extract_model(config, eval_set, model_dir, mesh):
    """Writes the model's features file (and `.mat` files on request) from its checkpoint."""
    model, variables = restore_inference(config, model_dir, mesh)
    say(f"{model_dir.label}: extracting {eval_set.test.num_frames} test frames with the "
        "checkpoint's EMA weights")
    write_model_features(config, eval_set, model, variables, model_dir, workdir_lib.FEATURES,
                         mesh)


def initial_features(config, eval_set, model_dir, mesh):
    """Features of the untrained network (its initial weights; with ImageNet weights, the
    ImageNet network with its BatchNorm moving statistics), for the before/after table.
    Kept once written: a resumed run does not extract them again."""
    path = model_dir.features(workdir_lib.INITIAL_FEATURES)
    if os.path.isfile(path):
        say(f"{model_dir.label}: untrained network's features already in {path}")
        return
    if config.model.pretrained:
        config_lib.check_weights(config, initial_features=True)
    model = methods.build_model(config, model_dir.head)
    variables = state_lib.init_variables(
        model, jax.random.PRNGKey(config.seed), image_shape=methods.image_shape(config),
        mesh=mesh, pretrained=config.model.pretrained or None, inference=True)
    os.makedirs(model_dir.path, exist_ok=True)
    say(f"{model_dir.label}: extracting the untrained network's features")
    write_model_features(config, eval_set, model, variables, model_dir,
                         workdir_lib.INITIAL_FEATURES, mesh)


def write_model_features(config, eval_set, model, variables, model_dir, stem, mesh):
    """The model's `<stem>.npz`: per-frame features of every test frame, with their ids,
    streamed to disk as they are extracted; its montage paths file next to it."""
    path = model_dir.features(stem)
    frames, loading = data_lib.input_from_config(config, eval_set.test)
    write_frame_features(
        model, variables, eval_set, path, mesh=mesh, batch_size=extraction_batch(config, mesh),
        frames=frames, loading=loading, pooling=config.eval.pooling,
        desc=f"{model_dir.label} {stem}")
    say(f"{model_dir.label}: wrote {path}")
    if config.eval.save_mat and stem == workdir_lib.FEATURES:
        write_mat(model_dir.mat, path, eval_set, config.data.layout)
        say(f"{model_dir.label}: wrote the MATLAB files in {model_dir.mat}")


@functools.lru_cache(maxsize=16)
def make_feature_fn(model, mesh):
    """A jitted `(variables, uint8 images [B,H,W,3]) -> float32 features [B, P, D]`, the
    same function for an equal model and mesh (so every split's extractions, and the
    untrained network's, share one compilation per batch shape)."""
    batch_sharding = parallel.batch_sharding(mesh)

    def extract_features(variables, images):
        images = images.astype(jnp.float32) / 127.5 - 1.0
        return model.apply(variables, images, train=False).astype(jnp.float32)

    return jax.jit(extract_features, out_shardings=batch_sharding)


def frame_feature_batches(model, variables, frames, *, mesh, batch_size,
                          loading=data_lib.Loading(), desc=None):
    """Yield (start, float32 features [b, P, D]) of every frame of `frames` (a frame source
    of a table, `data.frame_source`), in table order, one global batch at a time, on every
    process.

    Each process reads only the rows of each global batch its devices hold, as `loading`
    says (grain workers, read-ahead); the device work of batch i overlaps the reading of
    later batches (results are fetched one batch late). `desc`: label of a progress bar
    over the batches (process 0).
    """
    if batch_size % mesh.size:
        raise ValueError(f"eval.batch_size={batch_size} must be divisible by the "
                         f"{mesh.size} devices in use")
    feature_fn = make_feature_fn(model, mesh)
    sharding = parallel.batch_sharding(mesh)
    num_frames = len(frames)
    batches = data_lib.ordered_batches(frames, batch_size=batch_size, sharding=sharding,
                                       loading=loading)
    pending = None
    starts = tqdm.tqdm(range(0, num_frames, batch_size), desc=desc, unit="batch",
                       disable=desc is None or jax.process_index() != 0, dynamic_ncols=True)
    for start, batch in zip(starts, batches):
        images = jax.make_array_from_process_local_data(
            sharding, batch["image"], (batch_size,) + batch["image"].shape[1:])
        feats = feature_fn(variables, images)
        if pending is not None:
            yield _fetch(pending, batch_size, num_frames)
        pending = (feats, start)
    if pending is not None:
        yield _fetch(pending, batch_size, num_frames)


def _fetch(pending, batch_size, num_frames):
    feats, start = pending
    feats = np.asarray(multihost_utils.process_allgather(feats, tiled=True))  # [B, P, D]
    return start, feats[:min(batch_size, num_frames - start)]


def extract_frame_features(model, variables, frames, *, mesh, batch_size,
                           loading=data_lib.Loading()):
    """Features of every frame of `frames` (a table's frame source) in table order: float32
    [N, P, D] on every process (the training frames for `train.anchor_init="features"`;
    test sets are written to disk as they are extracted instead, by `write_frame_features`)."""
    out = None
    for start, feats in frame_feature_batches(model, variables, frames, mesh=mesh,
                                              batch_size=batch_size, loading=loading):
        if out is None:
            out = np.zeros((len(frames),) + feats.shape[1:], np.float32)
        out[start:start + len(feats)] = feats
    return out


def protocol_arrays(dataset, *, pooling):
    """The evaluator's arrays describing the test set's tracklets, queries and gallery."""
    test = dataset.test
    return dict(pid=test.tracklet_pid.astype(np.int64),
                cam=test.tracklet_camera.astype(np.int64) + 1,
                query=np.asarray(dataset.query, np.int64),
                gallery=np.asarray(dataset.gallery, np.int64),
                pooling=np.asarray(pooling),
                directions=np.asarray(dataset.directions))  # iLIDS-VID: "both" (mean of 1->2, 2->1)


def representative_frames(table):
    """[T] path of the middle frame (in frame order) of each tracklet: the montage's picture."""
    order = np.lexsort((table.frame, table.tracklet))  # by tracklet, then frame order
    counts = np.bincount(table.tracklet, minlength=table.num_tracklets)
    first = np.cumsum(counts) - counts
    middle = order[np.minimum(first + counts // 2, len(order) - 1)]
    return [str(p) if c else "" for p, c in zip(table.path[middle], counts)]


def write_frame_features(model, variables, dataset, path, *, mesh, batch_size, frames,
                         pooling, loading=data_lib.Loading(), dtype=np.float32, desc=None):
    """Extract every test frame (read from `frames`, the frame source of `dataset.test`)
    straight into the features file `path`, and its montage paths file (`X.paths.txt`:
    one representative frame per tracklet) next to it.

    All processes extract; process 0 writes, batch by batch, so memory stays at a few
    batches however many frames there are. Features nearly identical across frames give
    a DegenerateFeaturesWarning. `dtype`: how the features are stored (float16 halves the
    file; a value beyond float16's range is an error naming the frame).
    """
    test = dataset.test
    batches = frame_feature_batches(model, variables, frames, mesh=mesh, batch_size=batch_size,
                                    loading=loading, desc=desc)
    if jax.process_index() != 0:
        for _ in batches:
            pass
        return
    first = next(batches, None)
    if first is None:
        raise evaluation.FeaturesError(f"{path}: the test set has no frames")
    spread = evaluation.SpreadMeter(int(np.prod(first[1].shape[1:])))
    stride = max(1, test.num_frames // _SPREAD_FRAMES)

    def chunks():
        for start, feats in itertools.chain([first], batches):
            sample = feats[(-start) % stride::stride]  # frames whose index is a multiple of stride
            if len(sample):
                spread.add(evaluation.normalize_parts(sample) * np.sqrt(feats.shape[1]))
            yield feats

    evaluation.save_frame_features(
        path, chunks(), shape=(test.num_frames,) + first[1].shape[1:], dtype=dtype,
        frame_track=test.tracklet.astype(np.int64), **protocol_arrays(dataset, pooling=pooling))
    evaluation.save_montage_paths(path, representative_frames(test))
    message = spread.warning("extracted frame features", path)
    if message:
        warnings.warn(message, evaluation.DegenerateFeaturesWarning, stacklevel=2)


def write_mat(directory, features_path, dataset, layout):
    """The original MATLAB scripts' inputs, from the features file `features_path`:
    `test.mat` ([D, N], one column per frame, the parts flattened) with per-frame
    `testID.mat` / `testCAM.mat`; MARS reads `test0.mat` and `test1.mat` (the frames split
    in two halves). scipy builds each variable in memory: [P*D, N] float32 at a time."""
    if jax.process_index() != 0:
        return
    frame_feat = evaluation.load_features(features_path)["frame_feat"]
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
        atomic_write(os.path.join(directory, name), lambda f: scipy.io.savemat(
            f, {variable: np.ascontiguousarray(value, dtype=np.float32)}, do_compression=False))
