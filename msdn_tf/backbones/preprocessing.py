"""The reference image preprocessing (torchvision + PIL), bit-exact, in numpy and in-graph TF.

TransZero/MSDN extract features with ``Image.open(path).convert("RGB")``, then
``transforms.Resize(448)`` (PIL bilinear), ``CenterCrop(448)``, ``ToTensor()`` and
``Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])``. This module
reproduces each step:

* **Output size** (torchvision ``Resize(int)``): the shorter side becomes ``size``, the
  longer ``int(size * long / short)`` (truncated).
* **Resize** (PIL ``Image.resize(..., BILINEAR)`` on 8-bit images, Pillow's
  ``Resample.c``): a separable convolution, horizontal pass first, with the triangle
  filter whose support is scaled by the downscale factor (``support = max(in/out, 1)``),
  window ``[int(c - support + 0.5), int(c + support + 0.5))`` around ``c = (i + 0.5) *
  in/out``, weights normalised by their (sequential) sum, then turned into 22-bit fixed
  point (``int(0.5 + w * 2**22)``); each pass adds ``2**21``, shifts right by 22 and clips
  to uint8, so the intermediate image is uint8 too.
* **CenterCrop**: ``top = int(round((h - size) / 2))`` (round half to even), same for left.
* **ToTensor / Normalize**: ``x / 255`` then ``(x - mean) / std`` in float32.

:func:`pil_resize` (numpy) equals Pillow's output bit for bit (tested against Pillow on
many sizes). :func:`tf_pil_resize` computes the same fixed-point sums in-graph as float64
matrix products -- every partial sum is an integer below ``2**31``, so float64 is exact
and the result is again bit-identical; :func:`tf_preprocess_encoded` is the serving
path (TF decoding with ``INTEGER_ACCURATE`` IDCT; the remaining difference to PIL's
decoder is measured in ``docs/data.md``).

Image modes (:func:`load_image`, decoding with Pillow like the reference): RGB as is;
L, LA, P, RGBA, CMYK, YCbCr... converted with Pillow's ``convert("RGB")`` as the
reference does (alpha is dropped, not composited); 16/32-bit single-channel images
(``I;16``, ``I``, ``F``) are refused (Pillow's conversion clips them to 255, which
would silently give a wrong feature map); 16-bit RGB PNGs are read by Pillow as 8-bit
RGB. Images whose shorter side is below :data:`MIN_SIDE` or with more than
:data:`MAX_PIXELS` pixels are refused with an error naming the file.

Example:
    >>> import numpy as np
    >>> img = np.zeros((300, 400, 3), np.uint8)
    >>> reference_preprocess(img, 448).shape
    (448, 448, 3)

Reference:
    Pillow ``libImaging/Resample.c`` (``precompute_coeffs``, ``normalize_coeffs_8bpc``,
    ``ImagingResampleHorizontal_8bpc``); torchvision ``transforms.functional.resize``,
    ``center_crop``, ``to_tensor``, ``normalize``; Chen et al., MSDN, CVPR 2022, Sec. 4.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Tuple

import numpy as np

from msdn_tf.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIN_SIDE",
    "MAX_PIXELS",
    "PRECISION_BITS",
    "resized_size",
    "center_crop_offsets",
    "pil_coefficients",
    "pil_resize",
    "reference_preprocess",
    "load_image",
    "load_and_preprocess",
    "tf_pil_resize",
    "tf_preprocess_decoded",
    "tf_preprocess_encoded",
    "tf_preprocess_batch",
]

IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)
#: Smallest accepted shorter side in pixels (a 1x1 image would be a flat colour at 448).
MIN_SIDE = 16
#: Largest accepted image (pixels), Pillow's default decompression-bomb limit.
MAX_PIXELS = 89_478_485
#: Fixed-point precision of Pillow's 8-bit resampling (32 - 8 - 2).
PRECISION_BITS = 22
_ONE = float(1 << PRECISION_BITS)
_HALF = float(1 << (PRECISION_BITS - 1))


def resized_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """``(new_h, new_w)`` of torchvision ``Resize(size)`` (shorter side to ``size``).

    Example:
        >>> resized_size(375, 500, 448)
        (448, 597)
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def center_crop_offsets(height: int, width: int, size: int) -> Tuple[int, int]:
    """``(top, left)`` of torchvision ``CenterCrop(size)`` (Python's round, half to even)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def pil_coefficients(in_size: int, out_size: int):
    """Pillow's bilinear resampling window and fixed-point weights for one axis.

    Returns:
        ``(xmin (out,), n (out,), weights (out, ksize) int64)``: output ``i`` is
        ``sum_k in[xmin[i] + k] * weights[i, k]`` for ``k < n[i]`` (weights beyond are 0).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    n = xmax - xmin
    ss = 1.0 / filterscale
    taps = np.arange(ksize, dtype=np.int64)
    valid = taps[None, :] < n[:, None]
    d = np.abs(((xmin[:, None] + taps[None, :]).astype(np.float64) - center[:, None] + 0.5) * ss)
    w = np.where(valid & (d < 1.0), 1.0 - d, 0.0)
    ww = np.zeros(out_size, np.float64)
    for k in range(ksize):  # sequential, as Pillow sums them
        ww = ww + w[:, k]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * _ONE), np.trunc(0.5 + w * _ONE)).astype(np.int64)
    return xmin, n, np.where(valid, fixed, 0)


def _resample_axis(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    in_size = img.shape[axis]
    xmin, n, weights = pil_coefficients(in_size, out_size)
    img = np.moveaxis(img, axis, 0).astype(np.int64)  # (in, other, C)
    acc = np.full((out_size,) + img.shape[1:], 1 << (PRECISION_BITS - 1), np.int64)
    for k in range(weights.shape[1]):
        idx = np.minimum(xmin + k, in_size - 1)
        acc += img[idx] * weights[:, k].reshape((-1,) + (1,) * (img.ndim - 1))
    out = np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def pil_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow's ``Image.resize((width, height), BILINEAR)`` of a uint8 (H, W, C) array, exactly.

    Example:
        >>> pil_resize(np.full((2, 2, 3), 7, np.uint8), 3, 5)[..., 0]
        array([[7, 7, 7, 7, 7],
               [7, 7, 7, 7, 7],
               [7, 7, 7, 7, 7]], dtype=uint8)
    """
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"pil_resize takes a uint8 (H, W, C) array, got {img.dtype} {img.shape}")
    if img.shape[1] != width:
        img = _resample_axis(img, width, 1)
    if img.shape[0] != height:
        img = _resample_axis(img, height, 0)
    return img


def _pillow_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow's own ``resize((width, height), BILINEAR)`` of a uint8 RGB array: what torchvision calls.

    Two one-axis Pillow resizes, horizontal first with a uint8 image between them: what
    Pillow 4.3-12.x (the reference's) does in one 2-D call, and exactly
    :func:`pil_resize` (tested equal). Pillow 13 changed the pass order of 2-D resizes
    for some sizes, so a single 2-D call is not used. In C and without the GIL: about
    13x faster than :func:`pil_resize` on a 500x375 photo.
    """
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img), "RGB")
    if im.size[0] != width:
        im = im.resize((width, im.size[1]), Image.BILINEAR)
    if im.size[1] != height:
        im = im.resize((width, height), Image.BILINEAR)
    return np.asarray(im)


def reference_preprocess(img: np.ndarray, size: int = 448) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> float32 (size, size, 3): Resize, CenterCrop, ToTensor, Normalize.

    Channel-last (torch's tensor is the channel-first transpose of this).
    """
    h, w = img.shape[:2]
    new_h, new_w = resized_size(h, w, size)
    img = _pillow_resize(img, new_h, new_w)
    top, left = center_crop_offsets(new_h, new_w, size)
    img = img[top : top + size, left : left + size]
    x = img.astype(np.float32) / np.float32(255.0)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def load_image(path: str) -> np.ndarray:
    """Decode an image file with Pillow as the reference does; uint8 RGB (H, W, 3).

    Raises:
        DataError: naming the file: not an image / truncated, 16- or 32-bit single-channel
            (``I;16``, ``I``, ``F``), shorter side below :data:`MIN_SIDE`, more than
            :data:`MAX_PIXELS` pixels.
    """
    from PIL import Image

    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise DataError(
                        f"{path}: image is {w}x{h} ({w * h} pixels), more than the {MAX_PIXELS} "
                        "accepted; downscale it first"
                    )
                if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                    raise DataError(
                        f"{path}: a {im.mode} (16/32-bit single-channel) image; the reference's "
                        "convert('RGB') clips such values at 255, so convert it to 8-bit first"
                    )
                im.load()
                rgb = im if im.mode == "RGB" else im.convert("RGB")
                arr = np.asarray(rgb, dtype=np.uint8)
    except DataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: image too large ({exc})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise DataError(f"{path}: cannot read or decode the image ({type(exc).__name__}: {exc})") from None
    if min(arr.shape[:2]) < MIN_SIDE:
        raise DataError(
            f"{path}: image is {arr.shape[1]}x{arr.shape[0]}; the shorter side must be at least {MIN_SIDE} pixels"
        )
    return arr


def load_and_preprocess(path: str, size: int = 448) -> np.ndarray:
    """:func:`load_image` then :func:`reference_preprocess`: float32 (size, size, 3)."""
    return reference_preprocess(load_image(path), size)


# ---------------------------------------------------------------------------------------------
# In-graph TensorFlow version (serving). TensorFlow-specific by design: this runs in the export.


def _tf_coefficient_matrix(in_size, out_size):
    """Dense (out, in) float64 matrix of Pillow's fixed-point weights (integers)."""
    import tensorflow as tf

    in_size = tf.cast(in_size, tf.int32)
    out_size = tf.cast(out_size, tf.int32)
    in_f = tf.cast(in_size, tf.float64)
    out_f = tf.cast(out_size, tf.float64)
    scale = in_f / out_f
    filterscale = tf.maximum(scale, 1.0)
    support = 1.0 * filterscale
    ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
    xmin = tf.cast(tf.maximum(tf.math.floor(tf.maximum(center - support + 0.5, 0.0)), 0.0), tf.int32)
    xmax = tf.cast(tf.minimum(tf.math.floor(center + support + 0.5), in_f), tf.int32)
    n = xmax - xmin
    taps = tf.range(ksize)
    valid = taps[None, :] < n[:, None]
    pos = xmin[:, None] + taps[None, :]
    d = tf.abs((tf.cast(pos, tf.float64) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = tf.where(valid & (d < 1.0), 1.0 - d, tf.zeros_like(d))
    ww = tf.foldl(lambda acc, col: acc + col, tf.transpose(w), initializer=tf.zeros([out_size], tf.float64))
    w = tf.where(ww[:, None] != 0.0, w / tf.where(ww == 0.0, tf.ones_like(ww), ww)[:, None], w)
    fixed = tf.where(w < 0, -tf.math.floor(-(-0.5 + w * _ONE)), tf.math.floor(0.5 + w * _ONE))
    fixed = tf.where(valid, fixed, tf.zeros_like(fixed))
    rows = tf.broadcast_to(tf.range(out_size)[:, None], tf.shape(pos))
    idx = tf.stack([rows, tf.minimum(pos, in_size - 1)], axis=-1)
    return tf.scatter_nd(tf.reshape(idx, [-1, 2]), tf.reshape(fixed, [-1]), tf.stack([out_size, in_size]))


def _tf_round_shift(acc):
    import tensorflow as tf

    return tf.clip_by_value(tf.math.floor((acc + _HALF) / _ONE), 0.0, 255.0)


def tf_pil_resize(img, height, width):
    """In-graph :func:`pil_resize`: uint8 (H, W, 3) -> uint8 (height, width, 3), bit-exact."""
    import tensorflow as tf

    x = tf.cast(img, tf.float64)
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    shape = tf.shape(img)
    h, w = shape[0], shape[1]
    x = tf.cond(
        tf.not_equal(w, width),
        lambda: _tf_round_shift(tf.einsum("ow,hwc->hoc", _tf_coefficient_matrix(w, width), x)),
        lambda: x,
    )
    x = tf.cond(
        tf.not_equal(h, height),
        lambda: _tf_round_shift(tf.einsum("oh,hwc->owc", _tf_coefficient_matrix(h, height), x)),
        lambda: x,
    )
    return tf.cast(x, tf.uint8)


def tf_preprocess_decoded(img, size: int = 448):
    """In-graph :func:`reference_preprocess` of a decoded uint8 (H, W, 3) tensor."""
    import tensorflow as tf

    shape = tf.shape(img)
    h, w = shape[0], shape[1]
    tf.debugging.assert_greater_equal(tf.minimum(h, w), MIN_SIDE, message=f"image shorter side below {MIN_SIDE} pixels")
    tf.debugging.assert_less_equal(
        tf.cast(h, tf.int64) * tf.cast(w, tf.int64),
        tf.constant(MAX_PIXELS, tf.int64),
        message=f"image has more than {MAX_PIXELS} pixels",
    )
    hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    long_h = tf.cast(tf.math.floor(tf.cast(size * h, tf.float64) / wf), tf.int32)
    long_w = tf.cast(tf.math.floor(tf.cast(size * w, tf.float64) / hf), tf.int32)
    new_h = tf.where(w <= h, long_h, size)
    new_w = tf.where(w <= h, size, long_w)
    img = tf_pil_resize(img, new_h, new_w)
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float64) / 2.0), tf.int32)
    img = img[top : top + size, left : left + size, :]
    x = tf.cast(img, tf.float32) / 255.0
    x = (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)
    return tf.ensure_shape(x, [size, size, 3])


def tf_decode(encoded):
    """Encoded JPEG/PNG/BMP/GIF -> uint8 RGB (H, W, 3); JPEG with the accurate integer IDCT."""
    import tensorflow as tf

    def jpeg():
        return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")

    def other():
        return tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)

    img = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    return tf.ensure_shape(img, [None, None, 3])


def tf_preprocess_encoded(encoded, size: int = 448):
    """One encoded image (scalar tf.string) -> float32 (size, size, 3), the serving path."""
    return tf_preprocess_decoded(tf_decode(encoded), size)


def tf_preprocess_batch(images, size: int = 448):
    """(B,) encoded images -> (B, size, size, 3) normalised backbone input."""
    import tensorflow as tf

    return tf.map_fn(
        lambda e: tf_preprocess_encoded(e, size), images, fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32)
    )
