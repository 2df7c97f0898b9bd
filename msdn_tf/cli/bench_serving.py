"""Command: latency and throughput of an exported MSDN SavedModel on this machine's CPU.

Usage::

    python -m msdn_tf.bench_serving --export export/models/msdn_cub [--batches 1 64] [--iterations 20]
    python -m msdn_tf.bench_serving --synthetic cub [--batches 1 64] [--iterations 20]

What it measures and prints: :mod:`msdn_tf.perf.serving_latency`.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from msdn_tf.cli.common import CommandParser, add_verbose_flag, cli_main
from msdn_tf.perf.serving_latency import SYNTHETIC, run


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = CommandParser(command="bench_serving", description="CPU latency/throughput of an exported MSDN SavedModel.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", help="model base path or version folder")
    src.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="export a random model at these shapes first")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64], help="batch sizes to measure")
    p.add_argument("--iterations", type=int, default=20, help="timed calls per batch size")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--regions", type=int, default=196, help="regions R of the feature inputs (196 = 14x14)")
    args = add_verbose_flag(p).parse_args(argv)
    report = run(args.export, args.synthetic, args.batches, args.iterations, args.warmup, args.regions)
    print(json.dumps(report, indent=2))
    return 0
