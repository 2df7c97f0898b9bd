"""Train MSDN: ``python -m msdn_tf.train --dataset demo``.

The command is thin: :func:`msdn_tf.training.loop.run_training` does the work and is what
tests call (what a run directory holds is described there). ``--resume`` continues a run
from its checkpoint (:func:`msdn_tf.training.resume.resume_config` says which flags may
change). The last line of standard output is ``results.json``'s summary as one JSON object.
"""

from __future__ import annotations

import argparse

from msdn_tf import options
from msdn_tf.cli.common import CommandParser, add_common_flags, cli_main
from msdn_tf.config import Config, resolve_config
from msdn_tf.training.resume import resume_config


def build_parser() -> argparse.ArgumentParser:
    from msdn_tf.data.registry import DATASETS

    p = CommandParser(command="train", description="Train MSDN for zero-shot learning.")
    add_common_flags(p, dataset_help=f"dataset name: {', '.join(sorted(DATASETS))} (default demo)")
    p.add_argument("--seed", type=int, help="shortcut for --set train.seed=N")
    p.add_argument("--iterations", type=int, help="shortcut for --set train.iterations=N")
    p.add_argument("--run-dir", help="output folder (default runs/<dataset>-seed<N>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --run-dir (its model, checkpoint, results and TensorBoard events)",
    )
    p.add_argument(
        "--strategy",
        choices=list(options.STRATEGIES),
        help="shortcut for --set train.strategy=NAME (tf.distribute; multi_worker reads TF_CONFIG)",
    )
    p.add_argument(
        "--precision",
        choices=list(options.PRECISIONS),
        help="shortcut for --set train.precision=NAME (auto: bfloat16 where the hardware runs it "
        "natively, else float32)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def config_from_args(args) -> Config:
    """The resolved config of the flags: the dataset's YAML, ``--config`` files, ``--set`` and the shortcuts."""
    return resolve_config(args.dataset or "demo", args.config, args.set, flags=flag_triples(args))


def flag_triples(args) -> list:
    """``(section.key, value, flag)`` of the shortcut flags given (typed values, never YAML text)."""
    return [
        ("data.data_dir", args.data_dir, "--data-dir"),
        ("train.seed", args.seed, "--seed"),
        ("train.iterations", args.iterations, "--iterations"),
        ("train.strategy", getattr(args, "strategy", None), "--strategy"),
        ("train.precision", getattr(args, "precision", None), "--precision"),
    ]


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    changes = None
    if args.resume:
        config, changes = resume_config(args)
    else:
        config = config_from_args(args)
    if args.print_config:
        from msdn_tf.config import to_yaml

        print(to_yaml(config))
        return 0
    from msdn_tf.data.registry import get_spec

    get_spec(config.data.dataset)  # fail fast on an unknown name, before TensorFlow starts
    from msdn_tf.training.loop import run_training
    from msdn_tf.training.reporting import summary_line

    results = run_training(
        config, run_dir=args.run_dir, resume=args.resume, resume_changes=changes, overwrite=args.overwrite
    )
    print(summary_line(results))
    return 0
