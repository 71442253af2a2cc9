"""Image decoding and TF1-compatible bilinear resizing (NumPy + Pillow, thread friendly)."""
from __future__ import annotations

import functools
import io
import threading

import numpy as np
from PIL import Image, UnidentifiedImageError

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


@functools.lru_cache(maxsize=64)
def _plan(h: int, w: int, c: int, height: int, width: int):
    """Row sources and weights, and column sources and weights per channel (the columns of
    a [h, w * c] view), of resizing [h, w, c] to [height, width, c]."""
    y0, y1, wy = _axis_weights(h, height)
    x0, x1, wx = _axis_weights(w, width)
    channel = np.arange(c)
    return (y0, y1, wy[:, None], (x0[:, None] * c + channel).ravel(),
            (x1[:, None] * c + channel).ravel(), np.repeat(wx, c))   # [width * c] each


class _Scratch(threading.local):
    """Float buffers of one thread, kept from frame to frame: a fresh array this size is
    mapped by malloc and faulted in page by page on every frame (most of the old cost).
    One pair per role, grown to the largest frame seen (frames of any size share it)."""

    def __init__(self):
        self.buffers = {}

    def pair(self, role, shape):
        """Two float32 arrays of `shape` for `role` (distinct roles never share memory)."""
        size = int(np.prod(shape))
        if role not in self.buffers or self.buffers[role][0].size < size:
            self.buffers[role] = (np.empty(size, np.float32), np.empty(size, np.float32))
        return tuple(b[:size].reshape(shape) for b in self.buffers[role])


_scratch = _Scratch()


def resize_bilinear_tf1(image: np.ndarray, height: int, width: int, *, out=None) -> np.ndarray:
    """Resizes [h, w, C] to float32 [height, width, C] exactly as TF1's resize_bilinear.

    align_corners=False, half_pixel_centers=False; horizontal lerp first, then vertical,
    in float32, as the TF kernel computes it. `out`: a float32 [height, width * C] array to
    write into (returned reshaped), else a new one.
    """
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(f"resize_bilinear_tf1: expected [h, w, C], got shape {img.shape}")
    h, w, c = img.shape
    y0, y1, wy, x0, x1, wx = _plan(h, w, c, height, width)
    flat = img.reshape(h, w * c)
    left, rows = _scratch.pair("rows", (h, width * c))
    # gather in the input's dtype, then widen: the same float32 values as widening first
    np.copyto(left, np.take(flat, x0, axis=1), casting="unsafe")
    np.copyto(rows, np.take(flat, x1, axis=1), casting="unsafe")
    # same float32 expression order as TF: a + (b - a) * lerp
    rows -= left
    rows *= wx
    rows += left                                                    # [h, width * C]
    top = _scratch.pair("out", (height, width * c))[0]
    out = np.empty((height, width * c), np.float32) if out is None else out
    np.take(rows, y0, axis=0, out=top)
    np.take(rows, y1, axis=0, out=out)
    out -= top
    out *= wy
    out += top
    return out.reshape(height, width, c)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Rounds float pixels to the nearest uint8 (ties to even), clipped to [0, 255]."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# What to do about a frame that cannot be decoded.
_SKIP_ADVICE = ("fix or remove the file, or set --config.data.skip_corrupt=True to skip "
                "unreadable frames (each is listed)")


def decode(path: str) -> np.ndarray:
    """Decodes an image file to uint8 [h, w, 3] RGB; a clear error names an unreadable file.

    Every bit depth and mode becomes what it shows on 8 bits: palette, grey and bilevel
    images are expanded to RGB, alpha is dropped (as TF's decode_png with channels=3),
    16-bit samples are scaled by 255 / 65535 (not clipped), CMYK and other colour spaces
    are converted. Floating-point images, whose value range no file states, are refused.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:   # one read: Pillow's own small reads cost more than this
            data = io.BytesIO(f.read())
        with Image.open(data) as im:
            return _to_rgb8(im, path)
    except UnidentifiedImageError:
        raise DatasetError(f"cannot decode image {path}: not an image format Pillow reads; "
                           f"{_SKIP_ADVICE}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot decode image {path}: {e}; {_SKIP_ADVICE}") from e


def _to_rgb8(im, path):
    """uint8 [h, w, 3] of an open Pillow image (see `decode`)."""
    if im.mode == "RGB":
        return np.asarray(im)
    bits = _integer_bits(im)
    if bits is not None:
        samples = np.asarray(im).astype(np.float64)   # [h, w]
        grey = np.rint(samples * (255.0 / (2 ** bits - 1)))
        return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise ValueError("a floating-point image, whose value range the file does not state; "
                         "store the frames as 8- or 16-bit images")
    if im.mode.endswith("a"):   # premultiplied alpha (La, RGBa): un-premultiply first
        im = im.convert(im.mode[:-1] + "A")
    return np.asarray(im.convert("RGB"))


def _integer_bits(im):
    """Bits per sample of a greyscale image wider than 8 bits (Pillow's I;16* and I modes),
    else None. Mode I holds 32-bit integers: the file's own bit depth applies (a 16-bit PNG
    or TIFF), else all 32 bits."""
    if im.mode.startswith("I;16"):
        return 16
    if im.mode != "I":
        return None
    if im.format == "PNG":
        return 16   # PNG greyscale is at most 16 bits
    tags = getattr(im, "tag_v2", None)
    depth = tags.get(258) if tags is not None else None   # TIFF BitsPerSample
    if isinstance(depth, tuple):
        depth = depth[0]
    return int(depth) if depth else 32


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, C] -> uint8 [height, width, C] as the input pipeline resizes every frame:
    TF1 bilinear, rounded to the nearest integer; a frame already that size is unchanged."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    out = _scratch.pair("out", (height, width * image.shape[2]))[1]
    resize_bilinear_tf1(image, height, width, out=out)
    # bilinear weights are convex, so values stay within [0, 255]: round without clipping
    return np.rint(out, out=out).astype(np.uint8).reshape(height, width, image.shape[2])


def decode_resize(path: str, height: int, width: int) -> np.ndarray:
    """Decodes `path` and resizes it to uint8 [height, width, 3] with TF1 bilinear semantics."""
    return resize_uint8(decode(path), height, width)


def image_shape(image_size: int) -> tuple:
    """(H, W) of the network input: (image_size, image_size // 2)."""
    if image_size < 2:
        raise ValueError(f"image_size must be >= 2, got {image_size}")
    return int(image_size), int(image_size) // 2
