"""Developer check: torchvision-layout ResNet + reference preprocessing against PyTorch's figures.

Usage::

    # 1. in a venv with torch, torchvision and Pillow < 13 (not msdn-tf's):
    python tests/fixtures/make_backbone_fixtures.py --full-depth REF --images IMAGES [--weights resnet101.pth]
    # 2. here (no torch):
    python -m msdn_tf.backbones.verify --weights REF/resnet101_random.pth --images IMAGES \\
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

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from msdn_tf.errors import MSDNError, cli_main


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


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msdn_tf.backbones.verify", description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="the .pth the reference maps were made with")
    p.add_argument("--images", required=True, help="folder of the images (the same as for the reference)")
    p.add_argument("--reference", required=True, help="reference.npz from make_backbone_fixtures.py --full-depth")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="also compare serving_images of this SavedModel version folder (exported with "
        "--with-images from a checkpoint holding the same backbone) with serving_maps on the "
        "reference maps: fused scores, relative L2 <= 2e-2 and the same argmax",
    )
    args = p.parse_args(argv)
    try:
        with np.load(args.reference) as z:
            reference = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise MSDNError(f"{args.reference}: cannot read the reference maps ({exc})") from None
    paths = sorted(os.path.join(args.images, f) for f in os.listdir(args.images) if "map::" + f in reference)
    if not paths:
        raise MSDNError(f"no image of {args.images} has a map in {args.reference}")
    rows = compare(args.weights, paths, reference, args.image_size)
    served = compare_served(args.export, paths, reference) if args.export else []
    print("| image | extract rel L2 | serving rel L2 | decoded pixels differing | serving input max abs diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['image']} | {r['extract_rel_l2']:.2e} | {r['serving_rel_l2']:.2e} | "
            f"{r['decode_pixels_differing']} | {r['serving_input_max_abs_diff']:.3g} |"
        )
    worst = max(r["extract_rel_l2"] for r in rows)
    worst_serving = max(r["serving_rel_l2"] for r in rows)
    print(
        f"max extract rel L2 {worst:.2e} (tolerance {args.tolerance:g}); max serving rel L2 {worst_serving:.2e}; "
        f"{len(rows)} images"
    )
    served_ok = True
    if served:
        print("\n| image | served scores rel L2 | same argmax | same gzsl_class |")
        print("|---|---|---|---|")
        for r in served:
            print(f"| {r['image']} | {r['scores_rel_l2']:.2e} | {r['same_argmax']} | {r['same_gzsl_class']} |")
        served_ok = all(r["scores_rel_l2"] <= 2e-2 and r["same_argmax"] for r in served)
        print(
            f"max served scores rel L2 {max(r['scores_rel_l2'] for r in served):.2e} (tolerance 2e-2); "
            f"argmax equal for {sum(r['same_argmax'] for r in served)}/{len(served)}"
        )
    if args.json:
        from msdn_tf.utils import write_json

        write_json(
            args.json,
            {"rows": rows, "max_extract_rel_l2": worst, "max_serving_rel_l2": worst_serving, "served": served},
        )
    return 0 if worst <= args.tolerance and served_ok else 1


if __name__ == "__main__":
    sys.exit(main())
