"""Image decoding and TF1-compatible bilinear resizing (NumPy + Pillow, thread friendly).

`resize_bilinear_tf1` is the reference (checked bit for bit against TensorFlow);
`Resizer`, which the input pipeline uses, computes the same float32 operations in the same
order into buffers it keeps, so it gives the same bits without allocating per frame.
"""
from __future__ import annotations

import collections
import functools
import threading

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
    # in-place ops, same float32 expression order as TF: a + (b - a) * lerp
    left = np.take(img, x0, axis=1)                                 # [h, width, C]
    rows = np.take(img, x1, axis=1)
    rows -= left
    rows *= np.repeat(wx, img.shape[2]).reshape(width, img.shape[2])  # [width, C]: fast broadcast
    rows += left
    top = np.take(rows, y0, axis=0)                                 # [height, width, C]
    out = np.take(rows, y1, axis=0)
    out -= top
    out *= wy[:, None, None]
    out += top
    return out


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Rounds float pixels to the nearest uint8 (ties to even), clipped to [0, 255]."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class Resizer:
    """TF1 bilinear resize of uint8 [h, w, 3] frames of one size to uint8 [height, width, 3].

    Each output value is left + (right - left) * lerp along x, then top + (bottom - top) *
    lerp along y, in float32, rounded half to even: resize_bilinear_tf1's operations. The
    differences (right - left), (bottom - top) are taken once per source pixel and gathered
    (a source index's neighbour is itself at the clamped edge, where the difference is 0),
    and every intermediate lives in a buffer kept between frames. Not thread safe: one per
    thread (`resizer`).
    """

    def __init__(self, in_height: int, in_width: int, height: int, width: int):
        y0, _, wy = _axis_weights(in_height, height)
        x0, _, wx = _axis_weights(in_width, width)
        c = 3
        self.out_shape = (height, width, c)
        self._cols = (x0[:, None] * c + np.arange(c)).reshape(-1)            # [width * 3]
        self._rows = y0                                                       # [height]
        self._wx = np.ascontiguousarray(np.broadcast_to(np.repeat(wx, c), (in_height, width * c)))
        self._wy = np.ascontiguousarray(np.broadcast_to(wy[:, None], (height, width * c)))
        self._src = np.empty((in_height, in_width * c), np.float32)          # [h, w * 3]
        self._dx = np.zeros((in_height, in_width * c), np.float32)           # last pixel: 0
        self._dy = np.zeros((in_height, width * c), np.float32)              # last row: 0

    def __call__(self, image: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Writes the resized `image` (uint8 [h, w, 3]) into `out` (uint8 [height, width, 3])."""
        c = 3
        src, dx, dy = self._src, self._dx, self._dy
        np.copyto(src, image.reshape(src.shape))
        flat = src.reshape(-1)
        np.subtract(flat[c:], flat[:-c], out=dx.reshape(-1)[:-c])
        dx[:, -c:] = 0                      # the last pixel of a row has no right neighbour
        rows = src[:, self._cols]           # left, [h, width * 3]
        step = dx[:, self._cols]
        step *= self._wx
        rows += step                        # left + (right - left) * lerp
        np.subtract(rows[1:], rows[:-1], out=dy[:-1])
        out_f = rows[self._rows]            # top, [height, width * 3]
        step = dy[self._rows]
        step *= self._wy
        out_f += step                       # top + (bottom - top) * lerp
        np.rint(out_f, out=out_f)           # convex weights: already within [0, 255]
        np.copyto(out.reshape(out_f.shape), out_f, casting="unsafe")
        return out


# Resizers kept per thread, for the most recent input sizes (DukeMTMC-VideoReID's frames
# come in many sizes; the other benchmarks have one or two).
_RESIZERS_PER_THREAD = 16
_local = threading.local()


def resizer(in_height: int, in_width: int, height: int, width: int) -> Resizer:
    """This thread's Resizer for frames of (in_height, in_width) to (height, width)."""
    cache = getattr(_local, "resizers", None)
    if cache is None:
        cache = _local.resizers = collections.OrderedDict()
    key = (in_height, in_width, height, width)
    found = cache.get(key)
    if found is None:
        found = cache[key] = Resizer(*key)
        if len(cache) > _RESIZERS_PER_THREAD:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return found


def decode(path: str) -> np.ndarray:
    """Decodes an image file to uint8 [h, w, 3] RGB; a clear error names an unreadable file."""
    try:
        with Image.open(path) as im:
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot decode image {path}: {e}") from e


def decode_resize_into(path: str, out: np.ndarray) -> np.ndarray:
    """Decodes `path` into `out` (uint8 [height, width, 3]), resized with TF1 bilinear
    semantics when its size differs."""
    img = decode(path)
    height, width = out.shape[:2]
    if img.shape[0] == height and img.shape[1] == width:
        out[...] = img
        return out
    return resizer(img.shape[0], img.shape[1], height, width)(img, out)


def decode_resize(path: str, height: int, width: int) -> np.ndarray:
    """Decodes `path` and resizes it to uint8 [height, width, 3] with TF1 bilinear semantics."""
    return decode_resize_into(path, np.empty((height, width, 3), np.uint8))


def image_shape(image_size: int) -> tuple:
    """(H, W) of the network input: (image_size, image_size // 2)."""
    if image_size < 2:
        raise ValueError(f"image_size must be >= 2, got {image_size}")
    return int(image_size), int(image_size) // 2
