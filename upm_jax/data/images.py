"""Image decoding and TF1-compatible bilinear resizing (NumPy + Pillow, thread friendly)."""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from upm_jax.data.table import DatasetError


@functools.lru_cache(maxsize=64)
def _axis_weights(in_size: int, out_size: int):
    """Source indices and lerp weights of TF1 resize_bilinear (align_corners=False, legacy).

    TF1 maps output pixel i to source coordinate i * (in / out) (no half-pixel shift), in
    float32, then interpolates between floor and min(floor + 1, in - 1).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale            # [out]
    lo_f = np.floor(src)
    lo = np.maximum(lo_f.astype(np.int64), 0)
    hi = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    lerp = (src - lo_f).astype(np.float32)
    return lo, hi, lerp


def resize_bilinear_tf1(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes [h, w, C] to float32 [height, width, C] exactly as TF1's resize_bilinear.

    align_corners=False, half_pixel_centers=False; horizontal lerp first, then vertical,
    in float32, as the TF kernel computes it.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"resize_bilinear_tf1: expected [h, w, C], got shape {img.shape}")
    y0, y1, wy = _axis_weights(img.shape[0], height)
    x0, x1, wx = _axis_weights(img.shape[1], width)
    left = img[:, x0]                                               # [h, width, C]
    right = img[:, x1]
    rows = left + (right - left) * wx[None, :, None]                # [h, width, C]
    top = rows[y0]                                                  # [height, width, C]
    bottom = rows[y1]
    return top + (bottom - top) * wy[:, None, None]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Rounds float pixels to the nearest uint8 (ties to even), clipped to [0, 255]."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def decode(path: str) -> np.ndarray:
    """Decodes an image file to uint8 [h, w, 3] RGB; a clear error names an unreadable file."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot decode image {path}: {e}") from e


def decode_resize(path: str, height: int, width: int) -> np.ndarray:
    """Decodes `path` and resizes it to uint8 [height, width, 3] with TF1 bilinear semantics."""
    img = decode(path)
    if img.shape[0] == height and img.shape[1] == width:
        return img
    return to_uint8(resize_bilinear_tf1(img, height, width))


def image_shape(image_size: int) -> tuple:
    """(H, W) of the network input: (image_size, image_size // 2)."""
    if image_size < 2:
        raise ValueError(f"image_size must be >= 2, got {image_size}")
    return int(image_size), int(image_size) // 2
