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
        with Image.open(path) as im:
            return _to_rgb8(im, path)
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
    out = resize_bilinear_tf1(image, height, width)
    # bilinear weights are convex, so values stay within [0, 255]: round without clipping
    return np.rint(out, out=out).astype(np.uint8)


def decode_resize(path: str, height: int, width: int) -> np.ndarray:
    """Decodes `path` and resizes it to uint8 [height, width, 3] with TF1 bilinear semantics."""
    return resize_uint8(decode(path), height, width)


def image_shape(image_size: int) -> tuple:
    """(H, W) of the network input: (image_size, image_size // 2)."""
    if image_size < 2:
        raise ValueError(f"image_size must be >= 2, got {image_size}")
    return int(image_size), int(image_size) // 2
