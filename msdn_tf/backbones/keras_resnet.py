"""The Keras ResNet-101 backbone of ``--backbone keras_resnet101`` and its image loading.

``keras.applications.ResNet101(include_top=False)`` (stride in the first 1x1 convolution,
caffe weights) with TF decoding, antialiased bilinear resize, centre crop and
``keras.applications.resnet.preprocess_input``. **Not the reference features** (those come
from :mod:`msdn_tf.backbones.torchvision_resnet` with :mod:`msdn_tf.backbones.preprocessing`).
:func:`decode_and_crop` is shared by extraction (:mod:`msdn_tf.data.extraction`),
visualisation and the exported ``serving_images`` signature, so served images are
preprocessed exactly as the training features were.

Example::

    import tensorflow as tf
    from msdn_tf.backbones.keras_resnet import build_backbone, call_backbone, load_image

    net = build_backbone("none", image_size=448)          # random weights (tests)
    img = load_image(tf.constant("photo.jpg"), 448)       # (448, 448, 3) float32 0..255
    x = tf.keras.applications.resnet.preprocess_input(img[None])
    maps = call_backbone(net, x)                          # (1, 14, 14, 2048)

Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; the
feature layout is docs/reference.md §1.1.
"""

from __future__ import annotations

import os

from msdn_tf.errors import DataError, MSDNError


def build_backbone(weights: str = "imagenet", image_size: int = 448):
    """``keras.applications.ResNet101(include_top=False)`` with the given weights.

    Args:
        weights: ``"imagenet"`` (Keras download, needs network), ``"none"`` (random,
            for tests) or a local ``.h5``/``.weights.h5`` file.
    """
    import keras

    if weights in (None, "none", "None"):
        spec = None
    elif weights == "imagenet":
        spec = "imagenet"
    else:
        spec = str(weights)
        if not os.path.isfile(spec):
            raise DataError(
                f"{spec}: weights file not found (--weights takes 'imagenet', 'none' or a local .h5/.weights.h5 file)"
            )
    try:
        return keras.applications.ResNet101(include_top=False, weights=spec, input_shape=(image_size, image_size, 3))
    except DataError:
        raise
    except Exception as exc:
        if spec == "imagenet":
            raise MSDNError(
                f"could not get Keras' ResNet-101 ImageNet weights ({type(exc).__name__}: {exc}); "
                "without network download them elsewhere and pass --weights FILE"
            ) from exc
        if spec is not None:
            raise DataError(
                f"{spec}: cannot load ResNet-101 (include_top=False) weights from this file "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        raise


def decode_and_crop(encoded, image_size: int):
    """One encoded JPEG/PNG (scalar tf.string) -> float32 (S, S, 3) RGB in 0..255.

    Resize the shorter side to ``image_size`` (bilinear, antialiased) and centre-crop,
    as the reference's ``torchvision`` Resize(int) + CenterCrop. Undecodable bytes raise
    ``InvalidArgumentError``. Shared by extraction, visualisation and the exported
    ``serving_images`` signature, so served images are preprocessed exactly as training
    features were.
    """
    import tensorflow as tf

    img = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    img.set_shape([None, None, 3])
    shape = tf.shape(img)
    h, w = shape[0], shape[1]
    size = tf.constant(image_size, tf.int32)
    # As torchvision.transforms.Resize(int): the long side becomes int(size * long / short).
    long_h = tf.cast(tf.math.floor(image_size * tf.cast(h, tf.float64) / tf.cast(w, tf.float64)), tf.int32)
    long_w = tf.cast(tf.math.floor(image_size * tf.cast(w, tf.float64) / tf.cast(h, tf.float64)), tf.int32)
    new_h = tf.where(w <= h, long_h, size)
    new_w = tf.where(w <= h, size, long_w)
    img = tf.image.resize(tf.cast(img, tf.float32), tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    # As torchvision CenterCrop: top = round((h - size) / 2) (round half to even).
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
    img = img[top : top + image_size, left : left + image_size, :]
    img = tf.clip_by_value(img, 0.0, 255.0)
    img.set_shape([image_size, image_size, 3])
    return img


def load_image(path, image_size: int):
    """Read an image file and :func:`decode_and_crop` it; float32 0..255 RGB."""
    import tensorflow as tf

    return decode_and_crop(tf.io.read_file(path), image_size)


def call_backbone(backbone, x):
    """Run ``backbone`` on a batch ``x``; a Keras layer/model is called with ``training=False``."""
    import keras

    if isinstance(backbone, keras.layers.Layer):
        return backbone(x, training=False)
    return backbone(x)
