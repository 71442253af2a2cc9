"""The ported-weights file: an .npz of backbone params keyed by Flax path, the checkpoint's
BatchNorm moving statistics as a separate group, plus metadata.

Keys are '/'-joined paths from the ``params`` root, e.g. ``backbone/Conv2d_0/kernel``; the
moving statistics are keyed from the ``batch_stats`` root under STATS_PREFIX, e.g.
``batch_stats/backbone/Conv2d_0/BatchNorm/mean`` (training starts from 0/1 as the originals
did and ignores them; the ImageNet network in inference mode uses them). Files written
before the statistics were kept have no such keys and still load for training. The
metadata entries ``__meta__/backbone`` and ``__meta__/source`` are 0-d unicode arrays (so the
file loads without pickle). NumPy only.
"""
import os
import zipfile
from typing import Dict, Optional, Tuple

import numpy as np

from upm_jax.files import DamagedFileError, atomic_write, verify_npz

META_PREFIX = "__meta__/"
STATS_PREFIX = "batch_stats/"


class WeightsFileError(ValueError):
    """A weights file is missing, unreadable, or not a ported-weights file."""


def save_weights(path: str, params: Dict[str, np.ndarray], *, backbone: str, source: str,
                 stats: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Atomically write ``params`` (flat path -> array), the moving statistics ``stats``
    (flat path from the batch_stats root -> array) and metadata to ``path`` (.npz)."""
    arrays = {k: np.asarray(v) for k, v in params.items()}
    arrays.update({STATS_PREFIX + k: np.asarray(v) for k, v in (stats or {}).items()})
    arrays[META_PREFIX + "backbone"] = np.array(backbone)
    arrays[META_PREFIX + "source"] = np.array(source)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def has_moving_stats(path: str) -> bool:
    """Whether the weights file holds the checkpoint's BatchNorm moving statistics (read
    from the archive's directory alone)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.startswith(STATS_PREFIX) for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_weights(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray],
                                     Dict[str, str]]:
    """Read a file written by ``save_weights`` -> (params: flat path -> array, moving
    statistics: flat path from the batch_stats root -> array, empty for files written
    without them, metadata dict)."""
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
    stats = {k[len(STATS_PREFIX):]: v for k, v in arrays.items() if k.startswith(STATS_PREFIX)}
    params = {k: v for k, v in arrays.items()
              if not k.startswith((META_PREFIX, STATS_PREFIX))}
    if "backbone" not in meta:
        raise WeightsFileError(
            f"{path} is not a ported-weights file: it has no '{META_PREFIX}backbone' entry "
            f"(write it with python -m upm_jax.porting)")
    _check_values(path, {**params, **{STATS_PREFIX + k: v for k, v in stats.items()}})
    return params, stats, meta


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
