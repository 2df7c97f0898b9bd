"""Extract ResNet-101 feature maps into the feature-map HDF5 layout (docs/reference.md §1.1).

Usage::

    python -m msdn_tf.extract --images-root DIR --image-list LIST --out FILE.hdf5 \\
        [--backbone torchvision_resnet101|keras_resnet101] [--weights FILE|imagenet|none] \\
        [--batch-size 16] [--image-size 448] [--precision float32|mixed_bfloat16|auto] \\
        [--compression gzip|none] [--limit N] [--att-splits att_splits.mat \\
        --attributes-pkl CUB_attribute.pkl [--sent-splits sent_splits.mat] \\
        [--attribute-names attributes.txt]]

``LIST`` is an xlsa17 ``res101.mat``, an ``image_list.npz`` or a text/CSV file of
image paths relative to ``--images-root`` (CSV: first column the path, an optional
second column a 0-based label). The output rows follow the order of the list.

For training, write the file next to the xlsa17 metadata as
``DIR/features_resnet101_448.hdf5`` (the default ``data.feature_file``; layout (b) of
docs/data.md) and run ``python -m msdn_tf.train --dataset cub --data-dir DIR``.

Two backbones (``--backbone``):

* ``torchvision_resnet101`` (default; **the paper's features**): the reference pipeline
  of TransZero/MSDN. Each image is decoded with Pillow and ``convert("RGB")``, resized
  with torchvision's ``Resize(448)`` rule and Pillow's bilinear resampling, centre
  cropped, ``/255`` and ImageNet mean/std -- bit-exact in numpy
  (:mod:`msdn_tf.backbones.preprocessing`) -- then run through the torchvision-layout
  ResNet-101 trunk in Keras (:mod:`msdn_tf.backbones.torchvision_resnet`) with weights
  from ``--weights FILE.pth``: torchvision's ``resnet101-63fe2227.pth`` (ImageNet V1, what
  the reference used) or a released MSDN checkpoint (its ``resnet101.*`` tensors). No
  torch needed.
* ``keras_resnet101``: ``keras.applications.ResNet101(include_top=False)`` (stride in the
  first 1x1 convolution, caffe weights) with TF decoding, antialiased bilinear resize,
  centre crop and ``keras.applications.resnet.preprocess_input``. **Not the reference
  features**: results will not match the paper exactly.

Both store layer4 after the final ReLU channel-first as ``feature_map``
``(N, 2048, 14, 14)`` float32 for 448-pixel inputs.

The library behind this command is :mod:`msdn_tf.data.extraction` (the loop) with
:mod:`msdn_tf.backbones.keras_resnet` and :mod:`msdn_tf.backbones.torchvision_resnet`.
The run is resumable and crash-safe: rows are written to ``OUT.partial`` (the
``feature_map`` dataset is preallocated; the attribute ``done_count`` is flushed
after every batch). Re-running the same command continues at the first row not
done. Only a complete file, with the metadata keys added, is renamed to ``OUT``
(atomically), so a killed run never leaves a partial ``OUT``. With
``keras_resnet101`` and more than one visible GPU the batches are split over them
with ``tf.distribute.MirroredStrategy``; ``torchvision_resnet101`` decodes and
preprocesses with a small thread pool, one batch ahead, and runs the network
compiled (``predict_on_batch``) on the default device.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from msdn_tf.backbones.torchvision_resnet import TORCHVISION_WEIGHTS_HINT
from msdn_tf.cli.common import cli_main
from msdn_tf.data.extraction import BACKBONES, build_metadata, extract_features, read_image_list
from msdn_tf.errors import DataError, MSDNError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m msdn_tf.extract",
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
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "mixed_bfloat16", "auto"],
        help="torchvision backbone: float32 (default), mixed_bfloat16, or auto (bfloat16 where the CPU/GPU "
        "runs it natively, e.g. CPU flag avx512_bf16); bfloat16 maps differ from float32 by about 1 %% "
        "(python -m msdn_tf.bench_extract reports it)",
    )
    p.add_argument("--image-size", type=int, default=448, help="square input size (448 gives 14x14 maps)")
    p.add_argument("--compression", default="gzip", choices=["gzip", "none"])
    p.add_argument("--limit", type=int, default=None, help="only the first N images (smoke tests)")
    p.add_argument("--att-splits", default=None, help="xlsa17 att_splits.mat: store splits, att, class names")
    p.add_argument("--attributes-pkl", default=None, help="{DS}_attribute.pkl (or .npy): store w2v_att")
    p.add_argument("--sent-splits", default=None, help="CUB sent_splits.mat: store train_loc/val_loc")
    p.add_argument("--attribute-names", default=None, help="attributes.txt / predicates.txt / attributes.mat")
    p.add_argument("--restart", action="store_true", help="discard an existing OUT.partial")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--no-progress", action="store_true")
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
        precision=args.precision,
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
