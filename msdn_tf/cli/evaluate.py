"""Command: evaluate a run directory: ``python -m msdn_tf.evaluate --run DIR [--gamma G] [--calibration-curve]``.

Writes ``metrics.json``, ``per_class.csv``, ``report.md`` (also printed) and, with
``--calibration-curve``, ``curve.png`` into ``DIR/eval/`` (or ``--out``). What each holds
and which protocol a report names: the library, :mod:`msdn_tf.evaluation.report`.
"""

from __future__ import annotations

import argparse

from msdn_tf.cli.common import CommandParser, cli_main
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
    p.add_argument("--out", help="output folder (default RUN/eval)")
    return p


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    evaluate_run(
        args.run, gamma=args.gamma, data_dir=args.data_dir, calibration_curve=args.calibration_curve, out_dir=args.out
    )
    return 0
