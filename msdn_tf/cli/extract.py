"""Extract ResNet-101 feature maps into the feature-map HDF5 layout (docs/reference.md §1.1).

Usage::

    python -m msdn_tf.extract --images-root DIR --image-list LIST --out FILE.hdf5 \\
        [--backbone torchvision_resnet101|keras_resnet101] [--weights FILE|imagenet|none] \\
        [--batch-size 16] [--image-size 448] [--precision float32|mixed_bfloat16|auto] \\
        [--compression gzip|none] [--limit N] [--att-splits att_splits.mat \\
        --attributes-pkl CUB_attribute.pkl [--sent-splits sent_splits.mat] \\
        [--attribute-names attributes.txt]]

What LIST may be, the two backbones and how a run resumes: :mod:`msdn_tf.data.extraction` (the
library behind this command).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from msdn_tf.cli.common import CommandParser, cli_main
from msdn_tf.data.extraction import BACKBONES, extract_image_list


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        command="extract",
        description="Extract ResNet-101 feature maps (N, 2048, 14, 14) into the §1.1 HDF5 layout. "
        "Resumable: re-run the same command after an interruption. The default backbone, torchvision_resnet101, "
        "gives the paper's features.",
    )
    p.add_argument("--images-root", required=True, help="folder the listed image paths are relative to")
    p.add_argument(
        "--image-list",
        required=True,
        help="res101.mat, image_list.npz, or a .txt/.csv of image paths (row order of the output)",
    )
    p.add_argument("--out", required=True, help="output .hdf5 (work goes to OUT.partial until complete)")
    p.add_argument(
        "--backbone",
        default="torchvision_resnet101",
        choices=list(BACKBONES),
        help="torchvision_resnet101 (default): the network and PIL-exact preprocessing of TransZero/MSDN, "
        "the paper's features; keras_resnet101: keras.applications.ResNet101 with caffe preprocessing "
        "(not the paper's features)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="torchvision_resnet101: a torchvision resnet101 state_dict .pth (resnet101-63fe2227.pth) or "
        "a released MSDN checkpoint .pth (required). keras_resnet101: 'imagenet' (default; Keras "
        "download, needs network), a local .h5/.weights.h5 file, or 'none' (random, for tests)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per backbone call")
    p.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "mixed_bfloat16", "auto"],
        help="torchvision backbone: float32, mixed_bfloat16, or auto (bfloat16 where the CPU/GPU "
        "runs it natively, e.g. CPU flag avx512_bf16); bfloat16 maps differ from float32 by about 1 %% "
        "(python -m msdn_tf.bench_extract reports it)",
    )
    p.add_argument("--image-size", type=int, default=448, help="square input size (448 gives 14x14 maps)")
    p.add_argument("--compression", default="gzip", choices=["gzip", "none"], help="HDF5 compression of the features")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (smoke tests)")
    p.add_argument("--att-splits", default=None, help="xlsa17 att_splits.mat: store splits, att, class names")
    p.add_argument("--attributes-pkl", default=None, help="{DS}_attribute.pkl (or .npy): store w2v_att")
    p.add_argument("--sent-splits", default=None, help="CUB sent_splits.mat: store train_loc/val_loc")
    p.add_argument("--attribute-names", default=None, help="attributes.txt / predicates.txt / attributes.mat")
    p.add_argument("--restart", action="store_true", help="discard an existing OUT.partial")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    extract_image_list(
        args.image_list,
        args.out,
        images_root=args.images_root,
        backbone=args.backbone,
        weights=args.weights,
        batch_size=args.batch_size,
        image_size=args.image_size,
        compression=args.compression,
        limit=args.limit,
        att_splits=args.att_splits,
        attributes_pkl=args.attributes_pkl,
        sent_splits=args.sent_splits,
        attribute_names=args.attribute_names,
        restart=args.restart,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        precision=args.precision,
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
