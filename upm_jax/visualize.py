"""Grad-CAM pictures of what a trained re-id model looks at, overall and per part.

    python -m upm_jax.visualize --workdir DIR [--layer ENDPOINT] [--model lam|gam] [--split K] \
        FRAME [FRAME ...] --out cam.png

The rule (uPMnet's visualisation script): back-propagate the sum over parts of the mean of
each pooled part feature to a convolutional endpoint; divide that gradient by its RMS over
the frame's whole map (+1e-5); weight each channel by the spatial mean of its normalised
gradient; add the weighted channels onto a map of ones; ReLU; divide by the maximum; resize
to the frame. For part models (LAM, GAM) each part also gets its own map, from the gradient
of that part's feature alone. The gradient with respect to an endpoint is taken by adding
a zero perturbation to that module's output (a flax method interceptor), so the models
need no special code. The model runs in inference mode with the EMA weights.
"""
import argparse
import os
import sys
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from upm_jax.models import mobilenet_v1, resnet_v1

RMS_EPSILON = 1e-5
OVERLAY_ALPHA = 0.5
COLORMAP = "jet"


class VisualizeError(ValueError):
    """A request that cannot be drawn (unknown layer, no frames); the message says why."""


class Endpoint(NamedTuple):
    """A backbone map Grad-CAM can start from.

    name: the TF-slim end-point name users give; key: its key in the model's endpoint dict;
    path: the flax module path whose ``__call__`` returns it.
    """

    name: str
    key: str
    path: Tuple[str, ...]


def _mobilenet_endpoints():
    names = ["Conv2d_0"]
    for i in range(1, len(mobilenet_v1.SEPARABLE_LAYERS) + 1):
        names += [f"Conv2d_{i}_depthwise", f"Conv2d_{i}_pointwise"]
    return [Endpoint(n, n, ("backbone", n)) for n in names]


def _resnet_endpoints():
    scope = "resnet_v1_50"
    found = [Endpoint(f"{scope}/conv1", "conv1", ("backbone", "conv1"))]
    for block, _, units, _ in resnet_v1.BLOCKS:
        for u in range(1, units + 1):
            found.append(Endpoint(f"{scope}/{block}/unit_{u}/bottleneck_v1", f"{block}/unit_{u}",
                                  ("backbone", block, f"unit_{u}")))
        # A block's output is its last unit's output.
        found.append(Endpoint(f"{scope}/{block}", block, ("backbone", block, f"unit_{units}")))
    return found


_ENDPOINTS = {"mobilenet_v1": _mobilenet_endpoints, "resnet_v1_50": _resnet_endpoints}


def model_endpoints(model) -> Dict[str, Endpoint]:
    """The selectable endpoints of a ``ReidModel``, from input to output, by slim name."""
    return {e.name: e for e in _ENDPOINTS[model.backbone_name]()}


def resolve_endpoint(model, layer: Optional[str] = None) -> Endpoint:
    """The endpoint called ``layer``; None: the backbone's last convolutional map."""
    endpoints = model_endpoints(model)
    if layer is None:
        return list(endpoints.values())[-1]
    if layer not in endpoints:
        raise VisualizeError(
            f"--layer {layer!r} is not an endpoint of {model.backbone_name}; expected one of: "
            + ", ".join(endpoints))
    return endpoints[layer]


def cam_from_gradient(activation, gradient):
    """Grad-CAM maps [..., h, w] in [0, 1] from an endpoint and its gradient [..., h, w, C].

    The RMS is taken over each map's whole [h, w, C] extent (one frame, one objective).
    A map that ReLU leaves all zero stays zero rather than dividing by zero.
    """
    rms = jnp.sqrt(jnp.mean(jnp.square(gradient), axis=(-3, -2, -1), keepdims=True))
    weights = jnp.mean(gradient / (rms + RMS_EPSILON), axis=(-3, -2))  # [..., C]
    cam = jnp.maximum(1.0 + jnp.einsum("...hwc,...c->...hw", activation, weights), 0.0)
    peak = jnp.max(cam, axis=(-2, -1), keepdims=True)
    return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)


def _objectives(num_parts: int) -> np.ndarray:
    """[M, P] weights on the per-part feature means: all parts, then (P > 1) each part alone."""
    overall = np.ones((1, num_parts), np.float32)
    if num_parts == 1:
        return overall
    return np.concatenate([overall, np.eye(num_parts, dtype=np.float32)])


def perturbed_forward(model, endpoint: Endpoint):
    """``(variables, images, delta) -> (features [B, P, D], endpoint map)`` with ``delta``
    added to the endpoint's module output, so the gradient with respect to ``delta`` is the
    gradient with respect to the endpoint. Fails unless exactly that module returned the map."""

    def forward(variables, images, delta):
        hits = []

        def perturb(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.path == endpoint.path:
                hits.append(getattr(out, "shape", type(out).__name__))
                if hasattr(out, "shape"):
                    out = out + delta.astype(out.dtype)
            return out

        with nn.intercept_methods(perturb):
            feats, maps = model.apply(variables, images, train=False, return_endpoints=True)
        if hits != [maps[endpoint.key].shape]:
            raise RuntimeError(f"endpoint {endpoint.name}: module {'/'.join(endpoint.path)} "
                               f"returned {hits}, expected one map of {maps[endpoint.key].shape}")
        return feats, maps[endpoint.key]

    return forward


def make_grad_cam(model, endpoint: Endpoint):
    """A jitted ``(variables, uint8 frames [B, H, W, 3]) -> cams [B, M, H, W]``.

    M = 1 for one-part models (DAL), else 1 + P: the overall map, then one per part. The
    cams lie in [0, 1] and are resized (bilinear) from the endpoint's [h, w] to the frames'.
    ``model`` is any flax module called as ``model.apply(variables, images, train=False,
    return_endpoints=True)`` returning (features [B, P, D], {key: map}).
    """
    forward = perturbed_forward(model, endpoint)

    @jax.jit
    def grad_cams(variables, frames):
        images = frames.astype(jnp.float32) / 127.5 - 1.0
        feats_shape, map_shape = jax.eval_shape(
            lambda: forward(variables, images, jnp.zeros((), jnp.float32)))
        delta = jnp.zeros(map_shape.shape, jnp.float32)
        weights = jnp.asarray(_objectives(feats_shape.shape[1]))  # [M, P]

        def objective(delta, part_weights):
            feats, activation = forward(variables, images, delta)
            # Frames are independent in inference mode: summing over the batch gives each
            # frame's own gradient.
            return jnp.sum(jnp.mean(feats, axis=-1) * part_weights), activation

        grads, activation = jax.vmap(jax.grad(objective, has_aux=True), in_axes=(None, 0),
                                     out_axes=(0, None))(delta, weights)  # [M, B, h, w, C]
        cams = cam_from_gradient(activation[None], grads)  # [M, B, h, w]
        height, width = frames.shape[1:3]
        cams = jax.image.resize(cams, cams.shape[:2] + (height, width), "bilinear")
        return jnp.clip(jnp.swapaxes(cams, 0, 1), 0.0, 1.0)  # bilinear is convex: rounding only

    return grad_cams


def endpoint_shape(model, endpoint: Endpoint, variables, frames) -> Tuple[int, ...]:
    """[B, h, w, C] of ``endpoint`` for these frames (shapes only, nothing is computed)."""
    maps = jax.eval_shape(lambda: model.apply(variables, frames.astype(jnp.float32),
                                              train=False, return_endpoints=True))[1]
    return tuple(maps[endpoint.key].shape)


def stripe_bounds(model, height: int, width: int):
    """Image rows [(top, bottom)] of each part's stripe of the final map (LAM/GAM pooling)."""
    if model.num_parts == 1:
        return []
    final = jax.eval_shape(
        lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, height, width, 3)),
                                       return_endpoints=True))[0][1]
    rows_of_map = final[resolve_endpoint(model).key].shape[1]
    rows = rows_of_map // model.num_parts
    scale = height / rows_of_map
    return [(p * rows * scale, (p + 1) * rows * scale) for p in range(model.num_parts)]


class Restored(NamedTuple):
    """An inference model restored from a workdir, and what was chosen to get it."""

    model: nn.Module
    variables: dict
    image_size: int
    name: str
    split: int
    step: int


def restore_from_workdir(workdir: str, model_name: Optional[str] = None,
                         split: Optional[int] = None) -> Restored:
    """The EMA inference model of one trained model of a workdir, restored by the Python API
    (`upm_jax.extractor.load`). Defaults: the method's first model, the lowest split where
    the models have checkpoints (finished training or not)."""
    from upm_jax import extractor as extractor_lib

    loaded = extractor_lib.load(workdir, split=split, unfinished=True,
                                models=None if model_name is None else [model_name])
    chosen = loaded.models[0]
    return Restored(chosen.model, chosen.variables, loaded.image_size, chosen.name,
                    loaded.split, chosen.step)


def load_frames(paths: Sequence[str], image_size: int) -> np.ndarray:
    """uint8 [B, H, W, 3]: each frame decoded and resized as extraction does."""
    from upm_jax.data import images

    height, width = images.image_shape(image_size)
    return np.stack([images.decode_resize(p, height, width) for p in paths])


def frame_labels(paths: Sequence[str]):
    """Short row labels: each path below the frames' common folder (its name if just one)."""
    folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    common = os.path.commonpath(folders)
    if len(set(folders)) == 1:
        common = os.path.dirname(common)
    return [os.path.relpath(os.path.abspath(p), common) for p in paths]


def draw(frames: np.ndarray, cams: np.ndarray, out_png: str, *, labels: Sequence[str],
         title: str, stripes=(), dpi: int = 110):
    """One row per frame: the frame, then each map over it; a shared colour bar (PNG, atomic).
    Returns the matplotlib Figure.

    frames: uint8 [B, H, W, 3]; cams: [B, M, H, W] in [0, 1], overall first, then parts;
    stripes: per part (top, bottom) image rows, outlined on that part's map (and the title
    says what the dashed lines are).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from upm_jax.files import atomic_write

    rows, maps = cams.shape[:2]
    height, width = frames.shape[1:3]
    columns = ["frame", "overall"] + [f"part {p}" for p in range(1, maps)]
    panel = 1.3
    fig = Figure(figsize=(panel * len(columns) + 0.9, panel * height / width * rows + 0.7),
                 dpi=dpi)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, len(columns) + 1, width_ratios=[1] * len(columns) + [0.08],
                            wspace=0.05, hspace=0.12)
    for r in range(rows):
        for c, column in enumerate(columns):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(frames[r], interpolation="nearest")
            if c > 0:
                ax.imshow(cams[r, c - 1], cmap=COLORMAP, vmin=0.0, vmax=1.0,
                          alpha=OVERLAY_ALPHA, interpolation="bilinear")
            if c > 1 and stripes:
                for y in stripes[c - 2]:
                    ax.axhline(y - 0.5, color="white", linewidth=0.8, linestyle="--")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column, fontsize=8)
            if c == 0:
                ax.set_ylabel(labels[r], fontsize=6)
    # The bar shows the colour map at full opacity, not the see-through overlay.
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), COLORMAP),
                       cax=fig.add_subplot(grid[:, -1]))
    bar.set_label("Grad-CAM (normalised)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    if stripes:
        title += "\ndashed lines: the stripe of the frame that the part's feature pools"
    fig.suptitle(title, fontsize=8)
    top = 0.55 + 0.15 * title.count("\n")   # inches for the title's lines
    fig.subplots_adjust(left=0.08, right=0.9, top=1 - top / fig.get_figheight(), bottom=0.02)
    atomic_write(out_png, lambda f: fig.savefig(f, format="png"))
    return fig


def visualize(workdir: str, frame_paths: Sequence[str], out_png: str, *,
              layer: Optional[str] = None, model_name: Optional[str] = None,
              split: Optional[int] = None, dpi: int = 110) -> dict:
    """Grad-CAM figure of ``frame_paths`` for a workdir's trained model; returns what was
    drawn: the cams [B, M, H, W], the endpoint name and map shape, the model's name, split
    and step."""
    if not frame_paths:
        raise VisualizeError("no FRAME given: name at least one image file")
    restored = restore_from_workdir(workdir, model_name, split)
    endpoint = resolve_endpoint(restored.model, layer)
    frames = load_frames(frame_paths, restored.image_size)
    cams = np.asarray(make_grad_cam(restored.model, endpoint)(restored.variables, frames))
    map_shape = endpoint_shape(restored.model, endpoint, restored.variables, frames)
    height, width = frames.shape[1:3]
    title = (f"Grad-CAM, {restored.name.upper()} ({restored.model.backbone_name}) split "
             f"{restored.split}, step {restored.step}, EMA weights; layer {endpoint.name} "
             f"({map_shape[1]}x{map_shape[2]}x{map_shape[3]})")
    draw(frames, cams, out_png, labels=frame_labels(frame_paths), title=title,
         stripes=stripe_bounds(restored.model, height, width), dpi=dpi)
    return {"cams": cams, "layer": endpoint.name, "map_shape": map_shape,
            "model": restored.name, "split": restored.split, "step": restored.step}


def _parser():
    p = argparse.ArgumentParser(prog="python -m upm_jax.visualize",
                                description="Grad-CAM of a trained model on some frames.")
    p.add_argument("frames", nargs="+", metavar="FRAME", help="image files, one row each")
    p.add_argument("--workdir", required=True, help="a folder written by python -m upm_jax.main")
    p.add_argument("--out", required=True, metavar="OUT.png", help="the figure to write")
    p.add_argument("--layer", default=None, metavar="ENDPOINT",
                   help="slim end-point name (default: the backbone's last convolutional map)")
    p.add_argument("--model", default=None, help="lam or gam for method upm (default: the "
                                                 "method's first model)")
    p.add_argument("--split", type=int, default=None,
                   help="split K (default: the lowest split with checkpoints)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the figure")
    return p


def main(argv=None) -> int:
    args = _parser().parse_intermixed_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from upm_jax import run
    from upm_jax.extractor import ExtractorError

    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        print(f"error: --out {args.out}: the folder {folder} does not exist", file=sys.stderr)
        return 2
    try:
        drawn = visualize(args.workdir, args.frames, args.out, layer=args.layer,
                          model_name=args.model, split=args.split, dpi=args.dpi)
    except (VisualizeError, ExtractorError) + run.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Grad-CAM of model {drawn['model']} (split {drawn['split']}, step {drawn['step']}) "
          f"at {drawn['layer']} {list(drawn['map_shape'][1:])} for {len(args.frames)} frame(s) "
          f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from upm_jax import interrupts
    sys.exit(interrupts.command(main))
