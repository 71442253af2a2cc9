"""One export: an artifact written from an Extractor, held to upm_jax's own features, and
the JSON file beside it (`PATH.json`) that states its contract.

Before an artifact is put in place it is loaded back and run on CHECK_FRAMES random uint8
frames (as one batch, and its first frame alone), and its features are compared with the
Extractor's, which are `--mode extract`'s. The error is measured per part vector, as the
evaluation uses them (each part vector is normalised before pooling):

    error = max over frames n and parts p of |a[n, p] - b[n, p]| / |b[n, p]|

(Euclidean norms over D; b = upm_jax's, a = the artifact's; a vector whose norm is below
1e-6 of the largest is compared against that floor instead). Element-wise relative errors
are not used: near-zero elements make them meaningless. Above the tolerance the artifact
is refused: nothing is written and the error says why.

float32 models: 1e-5. bfloat16 models: their features are only defined up to their own
rounding, which is measured at export as the same error between upm_jax's bfloat16
features and the same weights computed in float32 (r). An artifact is exact to that
rounding when it lies within 2r of upm_jax's features: two computations that each differ
from the exact (float32) features by about r differ from each other by up to 2r. A single
bfloat16 rounding (2^-8 = 3.9e-3) is no bound: on the CPU demo model r is 1.5e-2, and
a bfloat16 artifact computing the same arithmetic with other convolutions lies 1.8e-2
from upm_jax's (docs/export.md). ONNX has no bfloat16 convolution, so its graph computes
in float32: its distance from upm_jax's bfloat16 features is r itself.
"""
import datetime
import importlib
import importlib.util
import json
import os
import shutil
import tempfile

import numpy as np


# format -> the module that writes and runs it (`write(extractor, path) -> details`,
# `open_artifact(path) -> uint8 frames -> float32 features`).
FORMATS = {"stablehlo": "upm_jax.export.stablehlo", "onnx": "upm_jax.export.onnx_graph",
           "savedmodel": "upm_jax.export.savedmodel"}
# What each format needs beyond upm_jax's runtime (the `export` extra).
_PACKAGES = {"stablehlo": (), "onnx": ("onnx", "onnxruntime"), "savedmodel": ("tensorflow",)}
# The largest feature error (the module docstring's measure) of a float32 artifact; a
# bfloat16 one may differ by ROUNDINGS times the model's own rounding (at least TOLERANCE).
TOLERANCE = 1e-5
ROUNDINGS = 2
CHECK_FRAMES, CHECK_SEED = 8, 0
_NORM_FLOOR = 1e-6
EVALUATION_RULE = ("per frame, each part vector L2-normalised and divided by sqrt(P); per "
                   "tracklet, the frames max-pooled (or mean-pooled: 'pooling'); the pooled "
                   "[P*D] vector L2-normalised; tracklets ranked by 'distance'")


class ExportError(RuntimeError):
    """An export that cannot be written as asked; the message says why."""


def sidecar_path(path):
    """The JSON file that describes the artifact at `path`."""
    return os.fspath(path).rstrip(os.sep) + ".json"


def format_module(fmt):
    """The module of format `fmt`, with a clear error when its packages are missing."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: expected one of {sorted(FORMATS)}")
    missing = [p for p in _PACKAGES[fmt] if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"format {fmt!r} needs {', '.join(missing)}: pip install "
                          "'upm_jax[export]'")
    return importlib.import_module(FORMATS[fmt])


def feature_error(got, ref):
    """max over frames and parts of |got - ref| / |ref| (norms over D; see the module
    docstring); `got`, `ref`: [N, P, D]."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    norms = np.linalg.norm(ref, axis=-1)  # [N, P]
    if not norms.size:
        return 0.0
    floor = max(_NORM_FLOOR * norms.max(), np.finfo(np.float64).tiny)
    return float((np.linalg.norm(got - ref, axis=-1) / np.maximum(norms, floor)).max())


def check_frames(extractor):
    """The random uint8 frames [CHECK_FRAMES, H, W, 3] every export is checked on."""
    height, width = extractor.image_shape
    return np.random.default_rng(CHECK_SEED).integers(0, 256, (CHECK_FRAMES, height, width, 3),
                                                      dtype=np.uint8)


def parity(extractor, run):
    """The artifact function `run` against the Extractor on check_frames: as one batch and
    its first frame alone. Returns the parity record of the JSON file."""
    frames = check_frames(extractor)
    ref = extractor(frames)
    got = np.concatenate([run(frames), run(frames[:1])])
    if got.shape != (len(frames) + 1,) + ref.shape[1:]:
        raise ExportError(f"the artifact returned features of shape {list(got.shape)} for "
                          f"{len(frames)} + 1 frames; upm_jax's are {list(ref.shape)}")
    dtype = extractor.dtype.name
    record = {
        "error": feature_error(got, np.concatenate([ref, ref[:1]])),
        "tolerance": TOLERANCE,
        "measure": "max over frames and parts of |a - b| / |b|, Euclidean norms of the "
                   "[D] part vectors; a = the artifact's features, b = upm_jax's",
        "reference": f"upm_jax's extraction ({dtype} models, the checkpoints' EMA weights) "
                     "in the exporting process",
        "frames": f"{CHECK_FRAMES} random uint8 frames (seed {CHECK_SEED}), run as one batch "
                  "and the first frame alone",
    }
    if dtype == "bfloat16":
        rounding = feature_error(_in_float32(extractor)(frames), ref)
        record["bfloat16_rounding"] = rounding
        record["tolerance"] = max(ROUNDINGS * rounding, TOLERANCE)
        record["tolerance_rule"] = (
            f"{ROUNDINGS} x bfloat16_rounding, the same error between upm_jax's bfloat16 "
            "features and its float32 features of the same weights")
    return record


def _in_float32(extractor):
    """The Extractor's models computing in float32 (the same float32 weights)."""
    from upm_jax.extractor import Extractor

    return Extractor([m._replace(model=m.model.clone(dtype=np.float32)) for m in extractor.models],
                     image_size=extractor.image_size, batch_size=extractor.batch_size,
                     mesh=extractor.mesh)


def check_output(fmt, out):
    """(the format's module, the absolute artifact path) when format `fmt` can be written
    at `out`; else an ExportError saying why. Asked before anything is computed."""
    module = format_module(fmt)
    out = os.path.abspath(os.fspath(out).rstrip(os.sep))
    parent = os.path.dirname(out)
    if os.path.isdir(out):
        raise ExportError(f"--out {out} is an existing folder: give a new path (the export "
                          "never deletes a folder)")
    if fmt == "savedmodel" and os.path.exists(out):
        raise ExportError(f"--out {out} exists: a savedmodel is a folder, give a new path")
    if not os.path.isdir(parent):
        raise ExportError(f"--out {out}: its folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: its folder {parent} is not writable")
    return module, out


def export(extractor, fmt, out):
    """Writes `extractor`'s features in format `fmt` at `out` (a file; a folder for
    savedmodel) and `out`.json, after checking the artifact; returns the JSON record.

    Both are written in a staging folder beside `out` and moved into place only when the
    check passes: nothing is written when it fails or anything else goes wrong. An existing
    file `out` is replaced; an existing folder is an error (it is never deleted).
    """
    module, out = check_output(fmt, out)
    staging = None
    try:
        staging = tempfile.mkdtemp(prefix=".tmp-export-", dir=os.path.dirname(out))
        staged = os.path.join(staging, os.path.basename(out))
        details = module.write(extractor, staged)
        checked = parity(extractor, module.open_artifact(staged))
        if not checked["error"] <= checked["tolerance"]:
            why = (f" ({ROUNDINGS} x the bfloat16 model's own rounding, "
                   f"{checked['bfloat16_rounding']:.3g})" if "bfloat16_rounding" in checked else "")
            raise ExportError(
                f"the {fmt} artifact's features differ from upm_jax's by {checked['error']:.3g} "
                f"(max over frames and parts of |a - b| / |b|), above the tolerance "
                f"{checked['tolerance']:.3g}{why}; nothing written")
        record = describe(extractor, fmt, out, details, checked, artifact_bytes(staged))
        with open(sidecar_path(staged), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        os.replace(staged, out)
        os.replace(sidecar_path(staged), sidecar_path(out))
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write the artifact ({e}); nothing written") \
            from e
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return record


def artifact_bytes(path):
    """Bytes of the artifact at `path` (a file, or a folder's files together)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def describe(extractor, fmt, out, details, checked, size):
    """The JSON record of an artifact: its input and output contract, the evaluation rule,
    where the weights came from, who exported it, and the parity measured."""
    import jax

    import upm_jax

    height, width = extractor.image_shape
    first = extractor.models[0].model
    layout, start = [], 0
    for m in extractor.models:
        layout.append({"model": m.name, "head": m.head, "dims": [start, start + m.model.feature_dim]})
        start += m.model.feature_dim
    return {
        "format": fmt,
        "artifact": os.path.basename(out),
        "bytes": size,
        "input": {"dtype": "uint8", "shape": ["N", height, width, 3],
                  "layout": "NHWC, RGB channels; any batch size N >= 1"},
        "preprocessing": {
            "resize": f"before the artifact: each frame resized to {height}x{width} by TF1 "
                      "bilinear resizing (align_corners=False, no half-pixel centres), rounded "
                      "to uint8, as upm_jax's input pipeline does "
                      "(upm_jax.data.images.resize_uint8)",
            "normalisation": "inside the artifact: float32(x) / 127.5 - 1",
        },
        "output": {"dtype": "float32", "shape": ["N", extractor.num_parts, extractor.feature_dim],
                   "layout": "per frame and part, the models' features concatenated along D",
                   "parts": layout},
        "evaluation": {"pooling": extractor.pooling, "distance": extractor.distance,
                       "rule": EVALUATION_RULE},
        "model": {"method": extractor.method, "backbone": first.backbone_name,
                  "depth_multiplier": first.depth_multiplier, "n_part": extractor.num_parts,
                  "dtype": extractor.dtype.name, "image_size": extractor.image_size},
        "source": {"workdir": extractor.workdir, "split": extractor.split,
                   "models": [{"name": m.name, "head": m.head, "step": m.step}
                              for m in extractor.models]},
        "exported": {"upm_jax": upm_jax.__version__, "jax": jax.__version__,
                     "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")},
        "format_details": details,
        "parity": checked,
    }


def read_sidecar(path):
    """The JSON record beside the artifact at `path`."""
    try:
        with open(sidecar_path(path), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{sidecar_path(path)}: cannot read the artifact's JSON file ({e})") \
            from e


def open_artifact(path):
    """(run, record): a `uint8 [N, H, W, 3] -> float32 [N, P, D]` NumPy function of the
    artifact at `path`, run by its format's own runtime, and its JSON record."""
    record = read_sidecar(path)
    return format_module(record["format"]).open_artifact(os.fspath(path)), record
