"""The ported-weights file: an .npz of backbone params keyed by Flax path, plus metadata.

Keys are '/'-joined paths from the ``params`` root, e.g. ``backbone/Conv2d_0/kernel``; the
metadata entries ``__meta__/backbone`` and ``__meta__/source`` are 0-d unicode arrays (so the
file loads without pickle). NumPy only.
"""
import os
import tempfile
import zipfile
from typing import Dict, Tuple

import numpy as np

from upm_jax.files import DamagedFileError, verify_npz

META_PREFIX = "__meta__/"


class WeightsFileError(ValueError):
    """A weights file is missing, unreadable, or not a ported-weights file."""


def save_weights(path: str, params: Dict[str, np.ndarray], *, backbone: str, source: str) -> None:
    """Atomically write ``params`` (flat path -> array) and metadata to ``path`` (.npz)."""
    arrays = {k: np.asarray(v) for k, v in params.items()}
    arrays[META_PREFIX + "backbone"] = np.array(backbone)
    arrays[META_PREFIX + "source"] = np.array(source)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the result is an ordinary shared file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_weights(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Read a file written by ``save_weights`` -> (flat path -> array, metadata dict)."""
    if not os.path.isfile(path):
        raise WeightsFileError(f"pretrained weights file not found: {path}")
    try:
        verify_npz(path, advice="port the checkpoint again with python -m upm_jax.porting")
    except DamagedFileError as e:
        raise WeightsFileError(f"pretrained weights file {e}") from None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise WeightsFileError(
            f"cannot read pretrained weights file {path}: not a valid .npz written by "
            f"python -m upm_jax.porting ({type(e).__name__}: {e})") from e
    meta = {k[len(META_PREFIX):]: str(v) for k, v in arrays.items() if k.startswith(META_PREFIX)}
    params = {k: v for k, v in arrays.items() if not k.startswith(META_PREFIX)}
    if "backbone" not in meta:
        raise WeightsFileError(
            f"{path} is not a ported-weights file: it has no '{META_PREFIX}backbone' entry "
            f"(write it with python -m upm_jax.porting)")
    _check_values(path, params)
    return params, meta


def _check_values(path: str, params: Dict[str, np.ndarray]) -> None:
    """Every weight must be a finite real float: a NaN would surface only as a NaN loss
    (blamed on the learning rate), and int or complex weights would be cast silently."""
    wrong = sorted(f"{k} ({v.dtype.name})" for k, v in params.items() if v.dtype.kind != "f")
    if wrong:
        raise WeightsFileError(
            f"pretrained weights file {path}: {len(wrong)} weight(s) are not real floating point: "
            f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}; re-port the checkpoint "
            "with python -m upm_jax.porting")
    bad = sorted(k for k, v in params.items() if not np.isfinite(v).all())
    if bad:
        counts = ", ".join(f"{k} ({int((~np.isfinite(params[k])).sum())} of {params[k].size})"
                           for k in bad[:5])
        raise WeightsFileError(
            f"pretrained weights file {path}: {len(bad)} weight(s) hold NaN or inf: {counts}"
            f"{' ...' if len(bad) > 5 else ''}; the file is damaged, re-port the checkpoint "
            "with python -m upm_jax.porting")
