"""Command: latency and throughput of an exported MSDN SavedModel on this machine's CPU.

Usage::

    python -m msdn_tf.bench_serving --export export/models/msdn_cub [--batches 1 64] [--iterations 20]
    python -m msdn_tf.bench_serving --synthetic cub [--batches 1 64] [--iterations 20]

What it measures and prints: :mod:`msdn_tf.perf.serving_latency`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from msdn_tf.cli.common import CommandParser, add_verbose_flag
from msdn_tf.errors import MSDNError
from msdn_tf.perf.serving_latency import SYNTHETIC, benchmark, synthetic_model


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
    try:
        if min(args.batches) < 1 or args.iterations < 1 or args.warmup < 0 or args.regions < 1:
            raise MSDNError("--batches, --iterations and --regions must be >= 1, --warmup >= 0")
        if args.synthetic:
            from msdn_tf.serving.export import export_saved_model

            with tempfile.TemporaryDirectory(prefix="msdn_bench_") as tmp:
                model, names = synthetic_model(args.synthetic)
                t0 = time.perf_counter()
                path = export_saved_model(
                    model,
                    Path(tmp) / "model",
                    class_names=names,
                    seen_classes=model.seen_classes,
                    unseen_classes=model.unseen_classes,
                )
                export_s = time.perf_counter() - t0
                report = benchmark(path, args.batches, args.iterations, args.warmup, args.regions)
                report["synthetic"] = args.synthetic
                report["export_s"] = export_s
        else:
            report = benchmark(args.export, args.batches, args.iterations, args.warmup, args.regions)
    except MSDNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0
