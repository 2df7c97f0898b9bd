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


def verify_backbone(
    weights, images, reference, *, image_size: int = 448, tolerance: float = 1e-3, export=None, blocks=(3, 4, 23, 3)
) -> dict:
    """What ``python -m msdn_tf.verify_backbone`` checks: :func:`compare` on every image of the
    folder ``images`` that has a map in the ``reference`` npz, and :func:`compare_served` with
    ``export``.

    Args:
        blocks: stage depths of the network in ``weights`` (``None``: read from the file).

    Returns:
        ``{"rows", "served", "max_extract_rel_l2", "max_serving_rel_l2", "tolerance", "ok"}``;
        ``ok`` is false when an extractor-path error exceeds ``tolerance`` or a served score
        misses 2e-2 / the argmax.
    """
    try:
        with np.load(reference) as z:
            maps = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise MSDNError(f"{reference}: cannot read the reference maps ({exc})") from None
    paths = sorted(os.path.join(images, f) for f in os.listdir(images) if "map::" + f in maps)
    if not paths:
        raise MSDNError(f"no image of {images} has a map in {reference}")
    rows = compare(weights, paths, maps, image_size, blocks=blocks)
    served = compare_served(export, paths, maps) if export else []
    worst = max(r["extract_rel_l2"] for r in rows)
    served_ok = all(r["scores_rel_l2"] <= 2e-2 and r["same_argmax"] for r in served)
    return {
        "rows": rows,
        "served": served,
        "max_extract_rel_l2": worst,
        "max_serving_rel_l2": max(r["serving_rel_l2"] for r in rows),
        "tolerance": tolerance,
        "ok": worst <= tolerance and served_ok,
    }


def report_text(report: dict) -> str:
    """The tables ``python -m msdn_tf.verify_backbone`` prints for a :func:`verify_backbone` report."""
    rows, served = report["rows"], report["served"]
    lines = [
        "| image | extract rel L2 | serving rel L2 | decoded pixels differing | serving input max abs diff |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['image']} | {r['extract_rel_l2']:.2e} | {r['serving_rel_l2']:.2e} | "
            f"{r['decode_pixels_differing']} | {r['serving_input_max_abs_diff']:.3g} |"
        )
    lines.append(
        f"max extract rel L2 {report['max_extract_rel_l2']:.2e} (tolerance {report['tolerance']:g}); "
        f"max serving rel L2 {report['max_serving_rel_l2']:.2e}; {len(rows)} images"
    )
    if served:
        lines += ["", "| image | served scores rel L2 | same argmax | same gzsl_class |", "|---|---|---|---|"]
        for r in served:
            lines.append(f"| {r['image']} | {r['scores_rel_l2']:.2e} | {r['same_argmax']} | {r['same_gzsl_class']} |")
        lines.append(
            f"max served scores rel L2 {max(r['scores_rel_l2'] for r in served):.2e} (tolerance 2e-2); "
            f"argmax equal for {sum(r['same_argmax'] for r in served)}/{len(served)}"
        )
    return "\n".join(lines)
