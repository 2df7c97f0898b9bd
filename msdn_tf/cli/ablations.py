"""Run the ablations of Table 2: ``python -m msdn_tf.ablations --dataset demo --rows gap,full``.

The command is thin: :func:`msdn_tf.experiments.ablations.run_ablations` does the work
(the rows, the checks and the report are described there and in docs/evaluation.md).
"""

from __future__ import annotations

import argparse

from msdn_tf.cli.common import CommandParser, add_common_flags, cli_main, config_from_common_flags
from msdn_tf.errors import ConfigError
from msdn_tf.experiments.ablations import ROWS, parse_rows, precision_check, quality_check, run_ablations


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(command="ablations", description="Run the ablations of Table 2.")
    p.add_argument("--dataset", default="demo", help="dataset name")
    p.add_argument("--rows", default="all", help=f"all, or a comma-separated list of: {', '.join(ROWS)}")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds: train.seed + 0..N-1")
    add_common_flags(p)
    p.add_argument("--out", help="output folder (default runs/ablations/<dataset>)")
    p.add_argument(
        "--check",
        action="store_true",
        help="assert full >= 3x chance on every seed and >= GAP mean + 5 points; exit 1 if not",
    )
    p.add_argument(
        "--check-precision",
        action="store_true",
        help="assert the rows full_bf16 and full agree within 1 point (mean final CZSL acc and H); exit 1 if not",
    )
    return p


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rows = parse_rows(args.rows)
    if args.check and not {"gap", "full"} <= set(rows):
        raise ConfigError("--check needs the rows gap and full (e.g. --rows gap,full)")
    result = run_ablations(config_from_common_flags(args), rows, args.out, seeds=args.seeds)
    status = 0
    if args.check:
        passed = quality_check(result)
        print("quality check: " + ("PASSED" if passed else "FAILED"))
        status = status or (0 if passed else 1)
    if args.check_precision:
        passed = precision_check(result)
        print("precision parity check: " + ("PASSED" if passed else "FAILED"))
        status = status or (0 if passed else 1)
    return status
