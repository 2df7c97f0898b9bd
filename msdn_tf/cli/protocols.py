"""Train and report under a model-selection protocol: ``python -m msdn_tf.protocols --dataset demo``.

The command is thin: :func:`msdn_tf.experiments.protocols.run_protocol` does the work
(the protocols ``reference``, ``final`` and ``validation`` are described there and in
docs/evaluation.md).
"""

from __future__ import annotations

import argparse
from typing import Optional

from msdn_tf.cli.common import CommandParser, add_common_flags, cli_main, config_from_common_flags
from msdn_tf.errors import ConfigError
from msdn_tf.experiments.protocols import run_protocol


def parse_floats(text: Optional[str], option: str) -> Optional[list]:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"{option} {text!r}: expected comma-separated numbers, e.g. 0.05,0.1,0.2") from exc
    if not values:
        raise ConfigError(f"{option}: empty list")
    return values


def build_parser() -> argparse.ArgumentParser:
    from msdn_tf.data.registry import DATASETS

    p = CommandParser(
        command="protocols",
        description="Train and report under a model-selection protocol (docs/evaluation.md).",
    )
    p.add_argument("--dataset", default="demo", help=f"dataset name: {', '.join(sorted(DATASETS))}")
    p.add_argument(
        "--protocol",
        default="validation",
        help="reference, final, validation, or a comma-separated list (default validation)",
    )
    add_common_flags(p)
    p.add_argument("--seeds", type=int, default=1, help="number of seeds: train.seed + 0..N-1")
    p.add_argument("--lambda-grid", help="lambda_cal values for validation, e.g. 0.05,0.1,0.2 (default: the config's)")
    p.add_argument(
        "--gamma-grid", help="calibration gammas for validation (default: the exact curve; 0 = no calibration)"
    )
    p.add_argument("--holdout", type=float, default=0.2, help="share of each train class held out")
    p.add_argument(
        "--scale-steps",
        action="store_true",
        help="retrain for the chosen steps x |trainval|/|train| (same epochs) instead of the same steps",
    )
    p.add_argument("--out", help="output folder (default runs/protocols/<dataset>)")
    return p


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run_protocol(
        config_from_common_flags(args),
        args.protocol,
        args.out,
        seeds=args.seeds,
        lambda_grid=parse_floats(args.lambda_grid, "--lambda-grid"),
        gamma_grid=parse_floats(args.gamma_grid, "--gamma-grid"),
        holdout_fraction=args.holdout,
        scale_steps=args.scale_steps,
    )
    return 0
