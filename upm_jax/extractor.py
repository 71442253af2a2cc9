"""The Python API: a finished workdir's trained models as a feature extractor.

    import upm_jax
    extractor = upm_jax.load("runs/prid")         # split 1's models, their EMA weights
    feats = extractor(frames)                     # uint8 [N, h, w, 3], any size -> [N, P, D]
    tracks = extractor.pool(feats, tracklet_ids)  # [T, P*D] unit vectors, as evaluated
    dist = extractor.distances(tracks[:1], tracks)

`load` restores each model of the run's method (`methods.METHODS`; for `upm` the LAM and
the GAM model) from its checkpoint and the workdir's recorded config alone, exactly as
`--mode extract` does (`extract.restore_inference`), and the features are computed by
extraction's own jitted function, batch size and sharding, so they equal the features files
of the run. Frames are resized as the input pipeline resizes them (`data.images`). This is
the one way a finished workdir's model is loaded outside a run (the Grad-CAM tool and
`python -m upm_jax.export` use it too). One process; all its local devices.
"""
import os
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from upm_jax import evaluation
from upm_jax import extract
from upm_jax import methods
from upm_jax import parallel
from upm_jax.data import images as images_lib
from upm_jax.workdir import Workdir


class ExtractorError(ValueError):
    """A workdir, model, split or input that cannot be used as asked; the message says why."""


class TrainedModel(NamedTuple):
    """One trained model of a workdir, restored for inference."""

    name: str            # dal | lam | gam (the workdir's sub-folder)
    head: str            # dal | local | global
    step: Optional[int]  # the checkpoint's training step (None: not from a checkpoint)
    model: object        # the flax ReidModel
    variables: dict      # {"params", "batch_stats"}: EMA params, frozen params, BN statistics


class Extractor:
    """Per-frame test features of one or more models, their parts' vectors concatenated.

    `models`: TrainedModels of the same input size and part count (their features
    [N, P, D_i] are concatenated along D in this order, as `upm` fuses LAM and GAM);
    `image_size`: the models' input height (width = height / 2); `batch_size`: frames per
    device call, a multiple of the mesh's devices; `pooling`, `distance`: the evaluation's
    rules (config.eval). `method`, `workdir`, `split`, `config` say where the models came from.
    """

    def __init__(self, models: Sequence[TrainedModel], *, image_size: int, batch_size: int,
                 mesh=None, pooling: str = "max", distance: str = "euclidean",
                 method: Optional[str] = None, workdir: Optional[str] = None,
                 split: Optional[int] = None, config=None):
        if not models:
            raise ExtractorError("an Extractor needs at least one model")
        parts = {m.model.num_parts for m in models}
        if len(parts) != 1:
            raise ExtractorError(f"models {[m.name for m in models]} have different part "
                                 f"counts {sorted(parts)}; only features of equal P concatenate")
        self.mesh = parallel.make_mesh(jax.local_devices()) if mesh is None else mesh
        if batch_size < 1 or batch_size % self.mesh.size:
            raise ExtractorError(f"batch_size={batch_size}: expected a positive multiple of the "
                                 f"{self.mesh.size} devices in use")
        self.models = tuple(models)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.pooling, self.distance = pooling, distance
        self.method, self.workdir, self.split, self.config = method, workdir, split, config
        self._feature_fns = [extract.make_feature_fn(m.model, self.mesh) for m in self.models]

    def __repr__(self):
        names = "+".join(m.name for m in self.models)
        source = f" from {self.workdir} split {self.split}" if self.workdir else ""
        return (f"Extractor({names}{source}: uint8 [N, {self.image_shape[0]}, "
                f"{self.image_shape[1]}, 3] -> float32 [N, {self.num_parts}, {self.feature_dim}])")

    @property
    def image_shape(self):
        """(H, W) of the models' input frames."""
        return images_lib.image_shape(self.image_size)

    @property
    def num_parts(self):
        """P of the features."""
        return self.models[0].model.num_parts

    @property
    def feature_dim(self):
        """D of the features: the models' part dimensions added up."""
        return sum(m.model.feature_dim for m in self.models)

    @property
    def dtype(self):
        """The compute dtype of the models (float32 or bfloat16; features are float32)."""
        return jnp.dtype(self.models[0].model.dtype)

    def prepare(self, frames) -> np.ndarray:
        """uint8 [N, H, W, 3] at the models' size, from uint8 frames [N, h, w, 3] or a
        sequence of uint8 [h, w, 3] arrays (sizes may differ) or image files; frames of
        another size are resized as the input pipeline resizes them (TF1 bilinear, rounded)."""
        height, width = self.image_shape
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            if frames.dtype != np.uint8 or frames.shape[-1] != 3:
                raise ExtractorError(f"frames: expected uint8 RGB images [N, h, w, 3], got "
                                     f"{_describe(frames)}")
            if frames.shape[1:3] == (height, width):
                return frames
            frames = list(frames)
        if isinstance(frames, (str, os.PathLike, np.ndarray)):
            raise ExtractorError(f"frames: expected uint8 images [N, h, w, 3] or a sequence of "
                                 f"images or image files, got {_describe(frames)}")
        out = np.empty((len(frames), height, width, 3), np.uint8)
        for i, frame in enumerate(frames):
            if isinstance(frame, (str, os.PathLike)):
                frame = images_lib.decode(os.fspath(frame))
            else:
                frame = np.asarray(frame)
                _check_frame(frame, f"frames[{i}]")
            out[i] = images_lib.resize_uint8(frame, height, width)
        return out

    def __call__(self, frames) -> np.ndarray:
        """float32 features [N, P, D] of `frames` (see `prepare`), computed batch by batch."""
        frames = self.prepare(frames)
        n = len(frames)
        out = np.empty((n, self.num_parts, self.feature_dim), np.float32)
        sharding = parallel.batch_sharding(self.mesh)
        for start in range(0, n, self.batch_size):
            batch = frames[start:start + self.batch_size]
            count = len(batch)
            if count < self.batch_size:  # the last batch padded with zero frames, as extraction
                batch = np.concatenate(
                    [batch, np.zeros((self.batch_size - count,) + batch.shape[1:], np.uint8)])
            batch = jax.device_put(batch, sharding)
            feats = [fn(m.variables, batch) for fn, m in zip(self._feature_fns, self.models)]
            out[start:start + count] = np.concatenate(
                [np.asarray(f)[:count] for f in feats], axis=2)
        return out

    def feature_function(self, conv_impl=None, matmul_precision=None):
        """A pure `uint8 [B, H, W, 3] -> float32 [B, P, D]` function of JAX arrays with the
        variables closed over as host constants (what the exports serialise): the
        preprocessing and every model's features, concatenated along D. `conv_impl`,
        `matmul_precision`: the models' convolution formulation (`models.layers.CONV_IMPLS`)
        and product precision (`models.MATMUL_PRECISIONS`); None: theirs."""
        changes = {k: v for k, v in (("conv_impl", conv_impl),
                                     ("matmul_precision", matmul_precision)) if v is not None}
        models = [(m.model.clone(**changes),
                   jax.tree.map(np.asarray, jax.device_get(m.variables))) for m in self.models]

        def features(frames):
            x = frames.astype(jnp.float32) / 127.5 - 1.0
            return jnp.concatenate(
                [model.apply(variables, x, train=False).astype(jnp.float32)
                 for model, variables in models], axis=2)

        return features

    def pool(self, features, tracklets=None) -> np.ndarray:
        """Unit tracklet features [T, P*D] by the evaluation's rule (`evaluation.pooling`):
        each part vector normalised and divided by sqrt(P), the tracklet's frames max- (or
        mean-, config.eval.pooling) pooled, the result normalised. `tracklets`: each frame's
        tracklet index [N] in 0..T-1 (None: all frames one tracklet); a tracklet without
        frames is a zero row."""
        features = np.asarray(features, np.float32)
        if features.ndim != 3 or features.shape[1:] != (self.num_parts, self.feature_dim):
            raise ExtractorError(f"features: expected [N, {self.num_parts}, {self.feature_dim}], "
                                 f"got shape {list(features.shape)}")
        if tracklets is None:
            tracklets = np.zeros(len(features), np.int64)
        tracklets = np.asarray(tracklets)
        if (tracklets.shape != (len(features),) or not np.issubdtype(tracklets.dtype, np.integer)
                or (len(tracklets) and tracklets.min() < 0)):
            raise ExtractorError(f"tracklets: expected one non-negative integer per frame "
                                 f"([{len(features)}]), got {_describe(tracklets)}")
        count = int(tracklets.max()) + 1 if len(tracklets) else 0
        return evaluation.pool_tracklets(features, tracklets.astype(np.int64), count,
                                         pooling=self.pooling)

    def distances(self, query, gallery) -> np.ndarray:
        """[n, m] distances between pooled tracklet features (config.eval.distance)."""
        return evaluation.pairwise_distances(query, gallery, distance=self.distance)


def _check_frame(frame, what):
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ExtractorError(f"{what}: expected uint8 RGB images [h, w, 3], got "
                             f"{_describe(frame)}")


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {list(value.shape)}"
    return type(value).__name__


def load(workdir, *, split: Optional[int] = None, models: Optional[Sequence[str]] = None,
         batch_size: Optional[int] = None, unfinished: bool = False) -> Extractor:
    """The Extractor of a finished workdir (a folder written by `python -m upm_jax.main`).

    `split`: which split's models (default: the lowest split where all of them have
    finished training, config.train.steps); `models`: model names to load (default: the
    method's test feature, all its models: `upm` -> lam and gam); `batch_size`: frames per
    call (default: extraction's, config.eval.batch_size or the per-backend choice);
    `unfinished`: accept models whose training has not reached config.train.steps (their
    newest checkpoint; the Grad-CAM tool looks at runs in progress). Each model's latest
    checkpoint, its EMA weights.
    """
    where = os.fspath(workdir)
    run_dir = Workdir(workdir)
    config = run_dir.read_record()
    if config is None:
        raise ExtractorError(f"workdir {where!r} has no config.json: expected a "
                             "folder written by python -m upm_jax.main")
    heads = dict(methods.METHODS[config.method])
    names = list(heads) if models is None else list(models)
    for name in names:
        if name not in heads:
            raise ExtractorError(f"model {name!r}: the workdir's method {config.method!r} "
                                 f"trains {list(heads)}")
    which = (f"model {names[0]!r} has" if len(names) == 1
             else "models " + ", ".join(repr(n) for n in names) + " have")
    by_split = {k: sorted((m for m in run_dir.split(k).models(config.method) if m.name in names),
                          key=lambda m: names.index(m.name))
                for k in run_dir.recorded_splits()}
    steps = {k: [m.latest_step() for m in dirs] for k, dirs in by_split.items()}
    needed = 0 if unfinished else config.train.steps
    ready = [k for k, found in steps.items()
             if found and all(s is not None and s >= needed for s in found)]
    started = {k: found for k, found in steps.items() if any(s is not None for s in found)}
    if not started:
        raise ExtractorError(f"workdir {where!r}: no split where {which} a checkpoint "
                             f"(expected {where}/split_K/<model>/checkpoints/): train first")
    if not ready:
        progress = "; ".join(
            f"split {k}: " + ", ".join(f"{m.name} at step {s}" if s is not None
                                       else f"{m.name} without a checkpoint"
                                       for m, s in zip(by_split[k], found))
            for k, found in started.items())
        raise ExtractorError(
            f"workdir {where!r} is not finished: no split where {which} trained "
            f"config.train.steps={config.train.steps} steps ({progress}); finish it with "
            f"python -m upm_jax.main --mode train --workdir {where}")
    split = ready[0] if split is None else int(split)
    if split not in ready:
        what = "checkpoints" if unfinished else "finished training"
        raise ExtractorError(f"split {split}: {which} {what} only for splits {ready}")
    mesh = parallel.make_mesh(jax.local_devices())
    restored = []
    for model_dir, step in zip(by_split[split], steps[split]):
        model, variables = extract.restore_inference(config, model_dir, mesh, step)
        restored.append(TrainedModel(model_dir.name, model_dir.head, int(step), model, variables))
    if batch_size is None:
        batch_size = extract.extraction_batch(config, mesh)
    return Extractor(restored, image_size=config.data.image_size, batch_size=batch_size,
                     mesh=mesh, pooling=config.eval.pooling, distance=config.eval.distance,
                     method=config.method, workdir=os.path.abspath(where),
                     split=split, config=config)
