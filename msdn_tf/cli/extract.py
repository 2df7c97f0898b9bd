"""Extract ResNet-101 feature maps into the feature-map HDF5 layout (docs/reference.md §1.1).

Usage::

    python -m msdn_tf.extract --images-root DIR --image-list LIST --out FILE.hdf5 \\
        [--backbone torchvision_resnet101|keras_resnet101] [--weights FILE|imagenet|none] \\
        [--batch-size 16] [--image-size 448] \\
        [--compression gzip|none] [--limit N] [--att-splits att_splits.mat \\
        --attributes-pkl CUB_attribute.pkl [--sent-splits sent_splits.mat] \\
        [--attribute-names attributes.txt]]

What LIST may be, the two backbones and how a run resumes: :mod:`msdn_tf.data.extraction` (the
library behind this command).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from msdn_tf.backbones.torchvision_resnet import TORCHVISION_WEIGHTS_HINT
from msdn_tf.cli.common import CommandParser, cli_main
from msdn_tf.data.extraction import BACKBONES, build_metadata, extract_features, read_image_list
from msdn_tf.errors import DataError, MSDNError


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
    if args.att_splits and not args.attributes_pkl:
        raise MSDNError("--att-splits needs --attributes-pkl too (a complete §1.1 file has w2v_att)")
    if args.limit is not None and (args.att_splits or args.attributes_pkl):
        raise MSDNError(
            "--limit makes a partial image set; it cannot be combined with --att-splits/"
            "--attributes-pkl (the splits index the full list)"
        )
    files, labels = read_image_list(args.image_list)
    if args.limit is not None:
        if args.limit < 1:
            raise MSDNError("--limit must be >= 1")
        files = files[: args.limit]
        labels = None if labels is None else labels[: args.limit]
    metadata = build_metadata(
        labels,
        len(files),
        att_splits=args.att_splits,
        attributes_pkl=args.attributes_pkl,
        sent_splits=args.sent_splits,
        attribute_names=args.attribute_names,
    )
    torchvision = args.backbone == "torchvision_resnet101"
    weights = args.weights if args.weights is not None else (None if torchvision else "imagenet")
    if torchvision:
        if weights is None or weights in ("imagenet", "none", "None"):
            raise DataError(TORCHVISION_WEIGHTS_HINT)
        if not os.path.isfile(weights):
            raise DataError(f"{weights}: weights file not found")
    elif weights not in ("imagenet", "none", "None") and not os.path.isfile(weights):
        raise DataError(
            f"{weights}: weights file not found (--weights takes 'imagenet', 'none' or a local .h5/.weights.h5 file)"
        )
    extract_features(
        files,
        args.out,
        images_root=args.images_root,
        weights=weights,
        preprocessing="torchvision" if torchvision else "keras",
        batch_size=args.batch_size,
        image_size=args.image_size,
        compression=None if args.compression == "none" else args.compression,
        metadata=metadata,
        restart=args.restart,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
