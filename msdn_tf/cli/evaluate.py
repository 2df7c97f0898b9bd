"""Command: evaluate a run directory: ``python -m msdn_tf.evaluate --run DIR [--gamma G] [--calibration-curve]``.

Writes ``metrics.json``, ``per_class.csv``, ``report.md`` (also printed) and, with
``--calibration-curve``, ``curve.png`` into ``DIR/eval/`` (or ``--out``). What each holds
and which protocol a report names: the library, :mod:`msdn_tf.evaluation.report`.

With ``--classes FILE.csv`` the run's model is first re-targeted to the trained classes
plus the file's (``--replace-classes``: the file's only; no retraining) and measured on the
test images of ``--data-dir`` whose class it serves: CZSL over the unseen side, GZSL U/S/H,
and the added, trained-unseen and trained-seen classes apart, into ``RUN/eval-classes/``
(library: :mod:`msdn_tf.zeroshot`).
"""

from __future__ import annotations

import argparse

from msdn_tf.cli.common import CommandParser, cli_main
from msdn_tf.errors import MSDNError
from msdn_tf.evaluation.report import evaluate_run


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        command="evaluate",
        description="Evaluate a run directory (trained or converted) on the test split.",
    )
    p.add_argument("--run", required=True, help="run directory with config.yaml and model.keras")
    p.add_argument(
        "--gamma",
        type=float,
        default=0.0,
        help="calibrated stacking: subtract G from seen-class scores, on top of the model's margin "
        "(which already favours unseen classes by 2*bias; default 0, as the reference)",
    )
    p.add_argument("--data-dir", help="override the run's data.data_dir")
    p.add_argument(
        "--calibration-curve",
        action="store_true",
        help="also compute the seen-unseen accuracy curve over gamma, its AUSUC and curve.png",
    )
    p.add_argument("--out", help="output folder (default RUN/eval, RUN/eval-classes with --classes)")
    p.add_argument(
        "--classes",
        metavar="FILE.csv",
        help="evaluate the model re-targeted to the trained classes plus this file's (see python -m msdn_tf.export "
        "--classes); --data-dir must hold test images of the added classes",
    )
    p.add_argument("--replace-classes", action="store_true", help="with --classes: only the file's classes")
    p.add_argument("--added-side", default="unseen", choices=["unseen", "seen"], help="side of the added classes")
    return p


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.classes:
        from msdn_tf.zeroshot import evaluate_run_with_classes

        if args.calibration_curve:
            raise MSDNError("--calibration-curve is not available with --classes")
        evaluate_run_with_classes(
            args.run,
            args.classes,
            data_dir=args.data_dir,
            replace=args.replace_classes,
            added_side=args.added_side,
            gamma=args.gamma,
            out_dir=args.out,
        )
        return 0
    if args.replace_classes:
        raise MSDNError("--replace-classes needs --classes FILE.csv")
    evaluate_run(
        args.run, gamma=args.gamma, data_dir=args.data_dir, calibration_curve=args.calibration_curve, out_dir=args.out
    )
    return 0
