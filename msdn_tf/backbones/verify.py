"""Developer check: torchvision-layout ResNet + reference preprocessing against PyTorch's figures.

Usage::

    # 1. in a venv with torch, torchvision and Pillow < 13 (not msdn-tf's):
    python tests/fixtures/make_backbone_fixtures.py --full-depth REF --images IMAGES [--weights resnet101.pth]
    # 2. here (no torch):
    python -m msdn_tf.verify_backbone --weights REF/resnet101_random.pth --images IMAGES \\
        --reference REF/reference.npz [--image-size 448] [--json OUT.json]

For every image it prints the relative L2 error ``|a - b| / |b|`` of the feature map
(C, 14, 14) against torchvision's for

* ``extract``: the extractor path (Pillow decoding, numpy PIL-exact preprocessing);
* ``serving``: the serving path (TF decoding, in-graph preprocessing,
  :func:`~msdn_tf.backbones.preprocessing.tf_preprocess_encoded`),

and how far the serving path's preprocessed input is from the extractor path's
(pixels that differ after decoding, max abs difference of the normalised input).
With ``--export DIR`` it also serves each image's JPEG bytes through the exported
``serving_images`` signature and compares the fused scores with those of
``serving_maps`` on torchvision's maps (relative L2 and argmax).

Exits 1 when any extractor-path error exceeds ``--tolerance`` (default 1e-3) or a
served score misses 2e-2 / the argmax.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from msdn_tf.errors import MSDNError


def compare(weights: str, images: Sequence[str], reference: dict, image_size: int = 448, blocks=(3, 4, 23, 3)) -> list:
    """Per-image figures (see the module docstring) as a list of dicts."""
    import tensorflow as tf

    from msdn_tf.backbones.preprocessing import load_and_preprocess, load_image, tf_decode, tf_preprocess_encoded
    from msdn_tf.backbones.torchvision_resnet import load_backbone_file

    model, _ = load_backbone_file(weights, blocks=blocks)  # blocks None: the depth the file holds
    rows = []
    for path in images:
        name = os.path.basename(path)
        ref = reference.get("map::" + name)
        if ref is None:
            raise MSDNError(f"the reference file has no 'map::{name}'")
        x_np = load_and_preprocess(path, image_size)
        with open(path, "rb") as fh:
            encoded = tf.constant(fh.read())
        x_tf = tf_preprocess_encoded(encoded, image_size).numpy()
        decoded_diff = int(np.sum(np.any(tf_decode(encoded).numpy() != load_image(path), axis=-1)))
        maps = np.asarray(model(np.stack([x_np, x_tf]), training=False))  # (2, h, w, C)
        rel = [float(np.linalg.norm(m.transpose(2, 0, 1) - ref) / np.linalg.norm(ref)) for m in maps]
        rows.append(
            {
                "image": name,
                "extract_rel_l2": rel[0],
                "serving_rel_l2": rel[1],
                "decode_pixels_differing": decoded_diff,
                "serving_input_max_abs_diff": float(np.max(np.abs(x_np - x_tf))),
            }
        )
    return rows


def compare_served(export_dir: str, images: Sequence[str], reference: dict) -> list:
    """Fused ``scores`` of ``serving_images`` (JPEG bytes) against ``serving_maps`` on torchvision's maps.

    Both signatures share the exported MSDN head, so the difference is the image path
    alone: TF decoding, in-graph preprocessing and the Keras backbone versus PyTorch.
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(str(export_dir))
    rows = []
    for path in images:
        name = os.path.basename(path)
        with open(path, "rb") as fh:
            got = loaded.signatures["serving_images"](images=tf.constant([fh.read()]))
        maps = np.transpose(reference["map::" + name], (1, 2, 0))[None].astype(np.float32)  # (1, h, w, C)
        want = loaded.signatures["serving_maps"](feature_maps=tf.constant(maps))
        a, b = got["scores"].numpy()[0], want["scores"].numpy()[0]
        rows.append(
            {
                "image": name,
                "scores_rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                "same_argmax": bool(np.argmax(a) == np.argmax(b)),
                "same_gzsl_class": bool(int(got["gzsl_class"].numpy()[0]) == int(want["gzsl_class"].numpy()[0])),
            }
        )
    return rows
