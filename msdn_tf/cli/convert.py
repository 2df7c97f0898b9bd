"""Command: convert the authors' PyTorch MSDN checkpoints into an msdn-tf run directory.

Usage::

    python -m msdn_tf.convert --torch-checkpoint CUB_MSDN_GZSL.pth --dataset cub \\
        --out runs/cub-official-gzsl [--data-dir data/CUB] [--set section.key=value ...]

The library (what is checked, what is written) is :mod:`msdn_tf.training.convert`; see
``docs/convert.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from msdn_tf.cli.common import CommandParser, cli_main
from msdn_tf.training.convert import REPORT_FILE, convert_checkpoint, summary


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        command="convert",
        description="Convert an authors' PyTorch MSDN checkpoint ({CUB,SUN,AWA2}_MSDN_{CZSL,GZSL}.pth) "
        "into an msdn-tf run directory. Needs no torch; the file is read without executing "
        "anything in it.",
    )
    p.add_argument("--torch-checkpoint", required=True, metavar="FILE", help="the .pth state_dict")
    p.add_argument(
        "--dataset",
        required=True,
        help="cub, sun or awa2 (checked against the dataset table and configs/<dataset>.yaml), "
        "or another name such as 'custom' (config defaults, sizes from the checkpoint)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write")
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder with att_splits.mat (and image_list.npz/res101.mat, attribute names): "
        "checks classes and attributes, writes metadata.json",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set model.fusion_weights=[1.0,0.0]",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    return p


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from msdn_tf.runlock import RunLock

    with RunLock(args.out, "convert --overwrite" if args.overwrite else "convert"):
        report = convert_checkpoint(
            args.torch_checkpoint,
            args.dataset,
            args.out,
            data_dir=args.data_dir,
            overrides=args.set,
            overwrite=args.overwrite,
        )
    print(summary(report))
    print(f"report: {Path(args.out) / REPORT_FILE}")
    return 0
