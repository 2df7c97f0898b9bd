"""Benchmark feature extraction: images/s, GFLOP/s and the fraction of the conv rate, in one run.

``python -m msdn_tf.bench_extract [--weights resnet101-63fe2227.pth] [--images DIR|LIST]
[--image-size 448] [--batch 4] [--variants before float32 auto] [--repeats 3]
[--torch-python PY] [--json [OUT]]``

It prints a short table; ``--json`` prints the full JSON report instead, ``--json OUT``
writes it to ``OUT`` (and prints the table).

The command is thin: :func:`msdn_tf.perf.extraction_speed.run_extraction_benchmark`
does the work (what is timed and the report are described there and in
docs/performance.md).
"""

from __future__ import annotations

import argparse
import sys

from msdn_tf.cli.common import CommandParser, add_report_flag, cli_main, print_report
from msdn_tf.perf.extraction_speed import VARIANTS, report_text, run_extraction_benchmark


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(command="bench_extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", help="torchvision resnet101 state_dict / MSDN checkpoint (default: seeded random)")
    p.add_argument("--images", help="folder or image list with at least 2 x --batch images (default: synthetic)")
    p.add_argument("--image-size", type=int, default=448, help="square input size")
    p.add_argument("--batch", type=int, default=4, help="images per network call")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["before", "float32", "auto"],
        choices=list(VARIANTS),
        help="before (the trunk as loaded), float32 (BatchNorm folded), auto / mixed_bfloat16 "
        "(folded, bfloat16 convolutions)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first, incl. tracing")
    p.add_argument("--blocks", type=int, nargs=4, default=[3, 4, 23, 3], help="random trunk's blocks (ResNet-101)")
    p.add_argument("--width", type=int, default=64, help="random trunk's conv1 channels")
    p.add_argument(
        "--torch-python",
        metavar="PY",
        help="also time torchvision in the same run: an interpreter with torch and torchvision "
        "(e.g. a separate venv's bin/python), run as a worker process on the same weights and images",
    )
    return add_report_flag(p)


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m msdn_tf.bench_extract " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run_extraction_benchmark(args, command=command, log=lambda line: print(line, file=sys.stderr))
    print_report(report, args.json_out, report_text)
    return 0
