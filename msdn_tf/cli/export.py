"""Command: export a trained MSDN as a TensorFlow Serving SavedModel with fused predictions.

The library is :mod:`msdn_tf.serving.export` (export) and :mod:`msdn_tf.serving.verify` (the check).

Usage::

    python -m msdn_tf.export --run RUN_DIR --out export/models/msdn_cub [--version N] \\
        [--gamma G] [--top-k 5] [--top-attributes 5] [--overwrite] [--no-verify] [--json] \\
        [--classes FILE.csv [--replace-classes] [--added-side unseen|seen]] \\
        [--with-images [--backbone auto|torchvision_resnet101|keras_resnet101] \\
         [--backbone-weights FILE|imagenet|none] --image-size 448]

Exit codes: 0 published, 1 the check failed (nothing published), 2 bad arguments or a write
failure. The signatures, the metadata and the check are described in
:mod:`msdn_tf.serving.export` and :mod:`msdn_tf.serving.verify`; ``--classes`` (a model
re-targeted to the trained classes plus the file's, without retraining) in :mod:`msdn_tf.zeroshot`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from msdn_tf.cli.common import CommandParser, add_verbose_flag, cli_main
from msdn_tf.serving.export import METADATA_FILE, ExportCheckFailed, export_run
from msdn_tf.serving.verify import report_markdown


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        command="export",
        description="Export a trained MSDN run as a TF Serving SavedModel "
        "(OUT/<version>/) and check it with TF's C++ loader.",
    )
    p.add_argument("--run", required=True, help="run directory (config.yaml + model.keras)")
    p.add_argument("--out", required=True, help="TF Serving model base path, e.g. export/models/msdn_cub")
    p.add_argument("--version", type=int, default=1, help="version folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version folder")
    p.add_argument(
        "--gamma",
        type=float,
        default=0.0,
        help="calibrated stacking: subtracted from seen-class scores for gzsl_class/top-k (default 0)",
    )
    p.add_argument("--top-k", type=int, default=5, help="classes returned per input (top_k_classes, top_k_scores)")
    p.add_argument(
        "--top-attributes",
        type=int,
        default=5,
        help="attribute ids returned as evidence with every answer (top_k_attributes)",
    )
    p.add_argument(
        "--classes",
        default=None,
        metavar="FILE.csv",
        help="serve the trained classes plus the classes of this file (header: class, then the run's attribute "
        "names; one row per class, values as in the training class table), without retraining",
    )
    p.add_argument("--replace-classes", action="store_true", help="with --classes: serve only the file's classes")
    p.add_argument(
        "--added-side",
        default="unseen",
        choices=["unseen", "seen"],
        help="side of the margin and of calibrated stacking the file's new classes take",
    )
    p.add_argument("--with-images", action="store_true", help="add serving_images (JPEG/PNG bytes -> backbone)")
    p.add_argument(
        "--backbone",
        default="auto",
        choices=["auto", "torchvision_resnet101", "keras_resnet101"],
        help="backbone of serving_images: auto (default) = torchvision_resnet101 from the run's "
        "backbone_resnet101.npz (written by msdn_tf.convert from a released checkpoint) when "
        "present, else keras_resnet101",
    )
    p.add_argument(
        "--backbone-weights",
        default=None,
        help="torchvision_resnet101: a .pth/.npz (default: RUN/backbone_resnet101.npz); "
        "keras_resnet101: 'imagenet' (default, Keras download), a local .h5 file or 'none' "
        "(random, for tests)",
    )
    p.add_argument(
        "--image-size", type=int, default=448, help="square image size of serving_images (448 gives 14x14 maps)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the run config when reading class names (e.g. data.data_dir=...)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the C++ loader / saved_model_cli check")
    p.add_argument("--verify-samples", type=int, default=3, help="random samples used by the check")
    p.add_argument("--json", action="store_true", help="print the check report as JSON instead of markdown")
    return p


def _print_report(report: dict, as_json: bool) -> None:
    if as_json:
        cli = {k: v for k, v in report.get("saved_model_cli", {}).items() if k != "output"}
        print(
            json.dumps({k: v for k, v in report.items() if k != "saved_model_cli"} | {"saved_model_cli": cli}, indent=2)
        )
    else:
        print(report_markdown(report))


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = add_verbose_flag(_parser()).parse_args(argv)
    try:
        path, report = export_run(
            args.run,
            args.out,
            version=args.version,
            overwrite=args.overwrite,
            gamma=args.gamma,
            top_k=args.top_k,
            overrides=args.set,
            with_images=args.with_images,
            backbone=args.backbone,
            backbone_weights=args.backbone_weights,
            image_size=args.image_size,
            verify=not args.no_verify,
            verify_samples=args.verify_samples,
            top_attributes=args.top_attributes,
            classes=args.classes,
            replace_classes=args.replace_classes,
            added_side=args.added_side,
            log=lambda msg: print(msg, file=sys.stderr),
        )
    except ExportCheckFailed as exc:  # an MSDNError with its own exit code: nothing was published
        _print_report(exc.report, args.json)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} (metadata: {Path(args.out) / METADATA_FILE})", file=sys.stderr)
    if report is not None:
        _print_report(report, args.json)
    return 0
