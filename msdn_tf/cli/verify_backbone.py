"""``python -m msdn_tf.verify_backbone``: check both extraction paths against PyTorch's maps.

The library is :mod:`msdn_tf.backbones.verify`.
"""

from __future__ import annotations

from typing import Optional, Sequence

from msdn_tf.backbones.verify import report_text, verify_backbone
from msdn_tf.cli.common import CommandParser, cli_main


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
    report = verify_backbone(
        args.weights,
        args.images,
        args.reference,
        image_size=args.image_size,
        tolerance=args.tolerance,
        export=args.export,
    )
    print(report_text(report))
    if args.json:
        from msdn_tf.utils import write_json

        write_json(args.json, {k: report[k] for k in ("rows", "max_extract_rel_l2", "max_serving_rel_l2", "served")})
    return 0 if report["ok"] else 1
