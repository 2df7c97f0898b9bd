"""``python -m msdn_tf.verify_backbone``: check both extraction paths against PyTorch's maps.

The library is :mod:`msdn_tf.backbones.verify`.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from msdn_tf.backbones.verify import compare, compare_served
from msdn_tf.cli.common import CommandParser, cli_main
from msdn_tf.errors import MSDNError


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = CommandParser(command="verify_backbone", description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="the .pth the reference maps were made with")
    p.add_argument("--images", required=True, help="folder of the images (the same as for the reference)")
    p.add_argument("--reference", required=True, help="reference.npz from make_backbone_fixtures.py --full-depth")
    p.add_argument("--image-size", type=int, default=448, help="square input size the reference maps were made at")
    p.add_argument(
        "--tolerance", type=float, default=1e-3, help="largest allowed relative L2 error of the extracted maps"
    )
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
