"""In-graph limits on the encoded images of ``serving_images``, checked before any image is decoded.

An encoded image is small and its decoded size is not: a 140 KB PNG of 12000 x 12000 pixels
decodes to 432 MB and its preprocessing took over 2 GB; a 138-byte PNG of 20000 x 1 pixels
is resized (shorter side to ``image_size``) to 448 x 8,960,000. TF Serving runs whatever the
signature does, so the checks live in the exported graph itself: the width and height are read
from the image header (JPEG through ``tf.io.extract_jpeg_shape``; PNG, BMP and WebP from
their fixed header fields) and refused with ``InvalidArgumentError`` (TF Serving:
INVALID_ARGUMENT / HTTP 400) before the image is decoded:

* a format other than JPEG, PNG, BMP or WebP; GIF is refused too: TensorFlow's GIF decoder
  (giflib) reads every frame of an animation before the first one can be taken, and a
  236 KB GIF of 60 frames of 2000 x 2000 took 245 MB with ``expand_animations=False``
  (an animated WebP cannot be decoded to RGB at all: TensorFlow refuses it);
* a side under :data:`MIN_SIDE` pixels (a 1 x 1 image says nothing about a bird);
* more than :data:`MAX_PIXELS` pixels (4096 x 4096);
* more than :data:`MAX_REQUEST_PIXELS` pixels in all the images of one request together;
* a longer side more than :data:`MAX_ASPECT` times the shorter one.

Then each image is decoded once more here and a blank one (every pixel the same colour) is
refused, as a NaN feature input is: the model would answer a class for it.

Example:
    >>> checked = guard_encoded_images(images)  # doctest: +SKIP  (inside the export's tf.function)
"""

from __future__ import annotations

MIN_SIDE = 16
MAX_PIXELS = 4096 * 4096
MAX_REQUEST_PIXELS = 4 * MAX_PIXELS
MAX_ASPECT = 10.0
FORMATS = "JPEG, PNG, BMP or WebP"


def limits() -> dict:
    """The limits, for the export metadata and the docs."""
    return {
        "min_side": MIN_SIDE,
        "max_pixels": MAX_PIXELS,
        "max_request_pixels": MAX_REQUEST_PIXELS,
        "max_aspect_ratio": MAX_ASPECT,
        "formats": FORMATS,
    }


def header_size(encoded):
    """``(height, width)`` int64 of one encoded image from its header, ``(-1, -1)`` for an unknown format.

    Reads at most the first 32 bytes (JPEG: its markers, via ``tf.io.extract_jpeg_shape``).
    """
    import tensorflow as tf

    head = tf.strings.substr(tf.strings.join([tf.strings.substr(encoded, 0, 32), tf.constant(b"\0" * 32)]), 0, 32)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)  # (32,)

    def big(i, n):
        return sum(b[i + k] * (1 << (8 * (n - 1 - k))) for k in range(n))

    def little(i, n):
        return sum(b[i + k] * (1 << (8 * k)) for k in range(n))

    def magic(offset, text: bytes):
        return tf.equal(tf.strings.substr(head, offset, len(text)), tf.constant(text))

    def jpeg():
        shape = tf.cast(tf.io.extract_jpeg_shape(encoded), tf.int64)
        return shape[0], shape[1]

    def png():
        return big(20, 4), big(16, 4)

    def gif():
        return little(8, 2), little(6, 2)

    def bmp():
        height = little(22, 4)
        height = tf.where(height >= (1 << 31), (1 << 32) - height, height)  # negative: a top-down bitmap
        width = little(18, 4)
        return height, tf.where(width >= (1 << 31), tf.constant(-1, tf.int64), width)

    def webp():
        vp8x = (little(27, 3) + 1, little(24, 3) + 1)
        bits = little(21, 4)
        vp8l = ((bits // (1 << 14)) % (1 << 14) + 1, bits % (1 << 14) + 1)
        vp8 = (little(28, 2) % (1 << 14), little(26, 2) % (1 << 14))
        is_x, is_l = magic(12, b"VP8X"), magic(12, b"VP8L")
        return (
            tf.where(is_x, vp8x[0], tf.where(is_l, vp8l[0], vp8[0])),
            tf.where(is_x, vp8x[1], tf.where(is_l, vp8l[1], vp8[1])),
        )

    def unknown():
        return tf.constant(-1, tf.int64), tf.constant(-1, tf.int64)

    return tf.case(
        [
            (magic(0, b"\xff\xd8\xff"), jpeg),
            (magic(0, b"\x89PNG\r\n\x1a\n"), png),
            (magic(0, b"GIF8"), gif),
            (magic(0, b"BM"), bmp),
            (tf.logical_and(magic(0, b"RIFF"), magic(8, b"WEBP")), webp),
        ],
        default=unknown,
        exclusive=False,
    )


def _check_one(encoded, index):
    """The header checks of one image, then its decoded pixels; returns its pixel count."""
    import tensorflow as tf

    image = tf.strings.format("image {} of the request", index)
    not_gif = tf.debugging.Assert(
        tf.not_equal(tf.strings.substr(encoded, 0, 4), b"GIF8"),
        [
            tf.strings.join(
                [image, f" is a GIF: not accepted (an animated GIF is decoded whole); send a {FORMATS} image"]
            )
        ],
    )
    with tf.control_dependencies([not_gif]):
        h, w = header_size(encoded)
    size = tf.strings.format("image {} of the request is {} x {} pixels (width x height)", (index, w, h))
    known = tf.debugging.Assert(
        tf.logical_and(h > 0, w > 0),
        [tf.strings.join([image, f" is not a {FORMATS} image (its header does not give a size)"])],
    )
    with tf.control_dependencies([known]):
        short, long = tf.minimum(h, w), tf.maximum(h, w)
        checks = [
            tf.debugging.Assert(
                short >= MIN_SIDE, [tf.strings.join([size, f": each side must be at least {MIN_SIDE} pixels"])]
            ),
            tf.debugging.Assert(
                h * w <= MAX_PIXELS,
                [tf.strings.join([size, f": at most {MAX_PIXELS} pixels (4096 x 4096) are accepted; shrink it"])],
            ),
            tf.debugging.Assert(
                tf.cast(long, tf.float64) <= MAX_ASPECT * tf.cast(short, tf.float64),
                [tf.strings.join([size, f": the longer side may be at most {MAX_ASPECT:g} times the shorter one"])],
            ),
        ]
    return h * w, checks


def guard_encoded_images(images):
    """``images`` ((B,) tf.string) once every limit of the module docstring holds; InvalidArgumentError otherwise."""
    import tensorflow as tf

    def header(args):
        encoded, index = args
        pixels, checks = _check_one(encoded, index)
        with tf.control_dependencies(checks):
            return tf.identity(pixels)

    n = tf.shape(images, out_type=tf.int64)[0]
    pixels = tf.map_fn(
        header, (images, tf.range(n)), fn_output_signature=tf.TensorSpec((), tf.int64), parallel_iterations=1
    )
    total = tf.debugging.Assert(
        tf.reduce_sum(pixels) <= MAX_REQUEST_PIXELS,
        [
            tf.strings.join(
                [
                    tf.strings.format(
                        "the {} images of this request have {} pixels together", (n, tf.reduce_sum(pixels))
                    ),
                    f": at most {MAX_REQUEST_PIXELS} per request; send fewer or smaller images",
                ]
            )
        ],
    )

    def not_blank(args):
        encoded, index = args
        image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
        blank = tf.reduce_all(tf.equal(image, image[:1, :1, :]))
        check = tf.debugging.Assert(
            tf.logical_not(blank),
            [
                tf.strings.format(
                    "image {} of the request is blank (every pixel the same colour): send a photograph", index
                )
            ],
        )
        with tf.control_dependencies([check]):
            return tf.constant(True)

    with tf.control_dependencies([total]):
        decoded = tf.map_fn(
            not_blank, (images, tf.range(n)), fn_output_signature=tf.TensorSpec((), tf.bool), parallel_iterations=1
        )
    with tf.control_dependencies([decoded]):
        return tf.identity(images)
