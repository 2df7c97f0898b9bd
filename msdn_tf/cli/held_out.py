"""Classes added after training, measured: ``python -m msdn_tf.held_out [--dataset demo] [--hold-out N]``.

Trains one run without some unseen classes (no image, no attribute row), adds them from
their descriptions afterwards (no retraining) and compares CZSL/GZSL on their test
images with a run that knew them from the start. The library is
:func:`msdn_tf.experiments.held_out.run_held_out_experiment`; docs/zero_shot.md shows the table.
Exit codes: 0 done, 2 bad arguments or data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from msdn_tf.cli.common import CommandParser, add_common_flags, cli_main, config_from_common_flags


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        command="held_out",
        description="Hold unseen classes out of training, add them afterwards from their descriptions, and "
        "compare with a run that knew them from the start.",
    )
    p.add_argument("--dataset", default="demo", help="dataset name (default demo)")
    p.add_argument(
        "--hold-out",
        default=None,
        help="how many unseen classes to hold out (seeded by train.seed; default half of them), or their names "
        "separated by commas",
    )
    add_common_flags(p)
    p.add_argument("--out", help="output folder (default <train.out_dir>/held_out/<dataset>)")
    return p


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from msdn_tf.experiments.held_out import run_held_out_experiment

    config = config_from_common_flags(args)
    if args.hold_out is None:
        hold = None
    elif args.hold_out.strip().isdigit():
        hold = int(args.hold_out)
    else:
        hold = [n.strip() for n in args.hold_out.split(",")]
    out = Path(args.out) if args.out else Path(config.train.out_dir) / "held_out" / config.data.dataset
    run_held_out_experiment(config, out, hold_out=hold)
    return 0
