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

With ``--classes FILE.csv`` the run's model is first re-targeted to the trained
classes plus the file's (``--replace-classes``: the file's only; no retraining,
:mod:`msdn_tf.zeroshot`) and measured on the test images of ``--data-dir`` whose class
it serves: CZSL over the unseen side, GZSL U/S/H, and the accuracy of the added,
trained-unseen and trained-seen classes apart. Writes ``RUN/eval-classes/`` (or ``--out``):
``metrics.json`` and ``report.md``.

The library is :mod:`msdn_tf.evaluation.report` (:mod:`msdn_tf.zeroshot` for ``--classes``).
"""

from __future__ import annotations

import argparse

from msdn_tf.cli.common import cli_main
from msdn_tf.errors import MSDNError
from msdn_tf.evaluation.report import evaluate_run


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m msdn_tf.evaluate",
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
