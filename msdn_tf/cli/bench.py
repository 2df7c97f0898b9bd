"""Benchmark MSDN training and evaluation against this machine's own matrix-multiply rate.

``python -m msdn_tf.bench [--regions 196 49] [--batch 50] [--steps N] [--jit/--no-jit]
[--precision float32|mixed_bfloat16|mixed_float16|auto] [--variants IMPL:JIT:PRECISION[:nocheck] ...] [--json [OUT]]``

prints a short table (images/s and the fraction of the machine's matmul rate per variant);
``--json`` prints the full JSON report instead, ``--json OUT`` writes it to ``OUT``.

The command is thin: :func:`msdn_tf.perf.model_speed.run_benchmark` does the work (what
is timed, the FLOP count and the report are described there and in docs/performance.md).
``KERAS_BACKEND=jax python -m msdn_tf.bench`` runs the same shapes on JAX.
"""

from __future__ import annotations

import argparse
import sys

from msdn_tf.cli.common import CommandParser, add_report_flag, add_verbose_flag, cli_main, print_report
from msdn_tf.options import PRECISIONS
from msdn_tf.perf.model_speed import CUB, IMPLS, report_text, run_benchmark


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(command="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--regions", type=int, nargs="+", default=[196, 49], help="R values to run")
    p.add_argument("--batch", type=int, default=50, help="training batch")
    p.add_argument("--eval-batch", type=int, default=100, help="evaluation batch")
    p.add_argument("--steps", type=int, default=3, help="calls per timed repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first, incl. compilation")
    p.add_argument(
        "--loop-steps",
        type=int,
        default=20,
        help="JAX: training (and evaluation) steps per dispatch, as the on-device training loop runs "
        "them (1 = one step per dispatch, as fit). TensorFlow: ignored",
    )
    p.add_argument("--matmul-steps", type=int, default=3, help="products per timed matmul repeat")
    p.add_argument(
        "--jit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="XLA-compile the steps (default: the model's training default, train.jit_compile)",
    )
    p.add_argument(
        "--impl",
        default="fused",
        choices=list(IMPLS),
        help="forward pass: fused (MSDN.call, one (B*R, F) x (F, 4K) product; default) or einsum "
        "(four separate einsum contractions, the code before issue 7)",
    )
    p.add_argument(
        "--precision",
        default="float32",
        choices=list(PRECISIONS),
        help="Keras dtype policy (default float32); auto: bfloat16 where the hardware runs it "
        "natively, else float32 (the choice is in the report)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="IMPL:JIT:PRECISION",
        help="several variants timed in the same run, interleaved (e.g. einsum:nojit fused:nojit "
        "fused:jit fused:jit:mixed_bfloat16); overrides --impl/--jit/--precision",
    )
    p.add_argument("--attributes", type=int, default=CUB["attributes"], help="K (CUB)")
    p.add_argument("--classes", type=int, default=CUB["classes"], help="C (CUB)")
    p.add_argument("--unseen", type=int, default=CUB["unseen"], help="unseen classes (CUB)")
    p.add_argument("--features", type=int, default=CUB["features"], help="F")
    p.add_argument("--embed", type=int, default=CUB["embed"], help="D")
    p.add_argument(
        "--compare-backends",
        nargs=2,
        metavar="BACKEND",
        help="time two Keras backends in ONE run (e.g. tensorflow jax): one worker process each, "
        "timed in turn every repeat; reports images/s and the per-repeat ratio (second / first). "
        "Each backend runs its training default (TensorFlow fused:nojit, JAX fused:jit with --loop-steps)",
    )
    return add_verbose_flag(add_report_flag(p))


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m msdn_tf.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.compare_backends:
        from msdn_tf.perf.backend_compare import compare_backends
        from msdn_tf.perf.backend_compare import report_text as compare_text

        report = compare_backends(args, command=command, log=lambda line: print(line, file=sys.stderr))
        print_report(report, args.json_out, compare_text)
    else:
        print_report(run_benchmark(args, command=command), args.json_out, report_text)
    return 0
