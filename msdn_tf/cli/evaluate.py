"""Command: evaluate a run directory: ``python -m msdn_tf.evaluate --run DIR [--gamma G] [--calibration-curve]``.

Works for any run directory holding ``config.yaml`` and ``model.keras``: one
written by ``python -m msdn_tf.train`` or by ``python -m msdn_tf.convert``.
Writes to ``DIR/eval/`` (or ``--out``):

* ``metrics.json``: CZSL acc, GZSL U/S/H of the fused logits and of each sub-net,
  the protocol that produced the weights, per-class accuracies; with
  ``--calibration-curve`` also the seen-unseen curve and its AUSUC;
* ``per_class.csv``: class id, class name, seen/unseen, images, CZSL accuracy
  (unseen classes), GZSL accuracy;
* ``report.md``: the same as markdown tables (also printed);
* ``curve.png`` with ``--calibration-curve``.

Every report names its ``protocol``: how the evaluated weights were chosen
(see docs/evaluation.md). The model in ``model.keras`` of a training run is its
last step: protocol ``final``. A run directory without a training history
(e.g. a converted checkpoint) is evaluated ``as-is``.

The library is :mod:`msdn_tf.evaluation.report`.
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
