"""Input-pipeline benchmark on a benchmark-sized feature cache.

Usage::

    python -m msdn_tf.bench_input --shape awa2|cub [--dir /tmp/msdn-bench] [--steps 200]
        [--fraction 1.0] [--mode pread|memmap] [--cold] [--delete]

What it generates, measures and prints: :mod:`msdn_tf.perf.input_pipeline`.
"""

from __future__ import annotations

import json

from msdn_tf.cli.common import CommandParser, cli_main
from msdn_tf.perf.input_pipeline import SHAPES, run


@cli_main
def main(argv=None) -> int:
    p = CommandParser(command="bench_input", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, choices=sorted(SHAPES), help="dataset shape to generate a cache of")
    p.add_argument("--dir", default="/tmp/msdn-bench", help="where the generated cache goes")
    p.add_argument("--steps", type=int, default=200, help="batches per measurement")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the images to generate (disk space)")
    p.add_argument("--mode", default="pread", choices=["pread", "memmap"], help="MemmapFeatures read mode")
    p.add_argument("--parallel-reads", type=int, default=2, help="tf.data num_parallel_calls of the reads")
    p.add_argument("--prefetch", type=int, default=2, help="batches tf.data prepares ahead")
    p.add_argument("--cold", action="store_true", help="drop the page cache before the first pass (root)")
    p.add_argument("--delete", action="store_true", help="delete the generated cache afterwards")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    print(json.dumps(run(args)))
    return 0
