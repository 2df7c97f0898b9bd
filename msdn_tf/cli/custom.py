"""Command: train and serve MSDN on your own attribute-annotated images: ``python -m msdn_tf.custom``.

Three commands (format and walkthrough: ``docs/custom_data.md``)::

    # 1. validate, compute splits and attribute vectors, extract features -> DATA_DIR
    python -m msdn_tf.custom prepare (--images DIR | --csv FILE) --attributes FILE.csv \\
        (--unseen FILE | --unseen-fraction 0.2 [--seed 0]) \\
        (--attribute-vectors FILE.npy|.csv | --word-vectors FILE.txt[.gz] [--allow-missing-words]) \\
        --out DATA_DIR [--weights imagenet|FILE|none] [--image-size 448] [--spec dataset.yaml]

    # 2. train + evaluate + export (TF Serving SavedModel) with configs/custom.yaml
    python -m msdn_tf.custom run --data-dir DATA_DIR --out RUN_DIR [--export-dir DIR] [--set k=v ...]

    # 3. the whole chain on generated coloured shapes, then a query through the local
    #    gRPC test double of TF Serving
    python -m msdn_tf.custom example --out DIR

The library is :mod:`msdn_tf.experiments.custom_workflow`. ``prepare`` is
:func:`msdn_tf.data.custom.prepare_dataset`; ``run`` uses the benchmark
code (:func:`msdn_tf.training.loop.run_training`, :func:`msdn_tf.evaluation.report.evaluate_run`,
:func:`msdn_tf.serving.export.export_saved_model`) on the ``custom`` entry of the dataset table.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from msdn_tf.cli.common import CommandParser, cli_main
from msdn_tf.experiments.custom_workflow import EXAMPLE_OVERRIDES, log_stderr, prepare, run_custom, run_example


def cmd_prepare(args) -> int:
    summary = prepare(
        args.out, vars(args), args.spec, overwrite=args.overwrite, restart=args.restart, progress=not args.no_progress
    )
    print(json.dumps(summary))
    return 0


def cmd_run(args) -> int:
    summary = run_custom(
        args.data_dir,
        args.out,
        config_files=args.config,
        overrides=args.set,
        flags=[("train.seed", args.seed, "--seed"), ("train.iterations", args.iterations, "--iterations")],
        export_dir=args.export_dir,
        export=not args.no_export,
        with_images=not args.no_images,
        gamma=args.gamma,
        top_k=args.top_k,
        verify_export=args.verify_export,
        visualize=args.visualize,
        resume=args.resume,
        overwrite=args.overwrite,
        log=log_stderr,
    )
    print(json.dumps(summary))
    return 1 if summary.get("export_check_ok") is False else 0


def cmd_example(args) -> int:
    result = run_example(
        args.out,
        image_size=args.image_size,
        num_classes=args.classes,
        images_per_class=args.images_per_class,
        seed=args.seed,
        overrides=args.set,
        serve=not args.no_serve,
        top_k=args.top_k,
    )
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        command="custom",
        description="MSDN on your own attribute-annotated images (docs/custom_data.md).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("prepare", help="validate, split, compute attribute vectors, extract features -> DATA_DIR")
    a.add_argument(
        "--spec",
        help="dataset.yaml holding any of the options below (paths relative to it); "
        "flags given on the command line win",
    )
    src = a.add_mutually_exclusive_group()
    src.add_argument("--images", help="folder of class folders: DIR/<class>/*.jpg|png")
    src.add_argument(
        "--csv", help="CSV of path,class[,split] (header optional; paths relative to the CSV or --images-root)"
    )
    a.add_argument("--images-root", help="folder the --csv paths are relative to")
    a.add_argument("--attributes", help="class x attribute CSV: header 'class,attr1,...', one row per class")
    un = a.add_mutually_exclusive_group()
    un.add_argument("--unseen", help="unseen class names: .txt (one per line) or .yaml list")
    un.add_argument("--unseen-fraction", type=float, help="hold out this fraction of the classes at random")
    a.add_argument("--seed", type=int, help="seed of the unseen draw, the splits and a random backbone (default 0)")
    vec = a.add_mutually_exclusive_group()
    vec.add_argument("--attribute-vectors", help="K x D attribute vectors: .npy or .csv")
    vec.add_argument(
        "--word-vectors",
        help="word vectors, word2vec text ('N D' header) or GloVe, optionally .gz: "
        "each attribute = the sum of the vectors of its words",
    )
    a.add_argument(
        "--allow-missing-words",
        action="store_true",
        help="skip words missing from --word-vectors (warning) instead of failing",
    )
    a.add_argument(
        "--allow-zero-vectors",
        action="store_true",
        help="accept attributes none of whose words were found (all-zero vectors) instead of failing",
    )
    a.add_argument(
        "--test-seen-fraction", type=float, help="share of each seen class held out as test_seen (default 0.2)"
    )
    a.add_argument(
        "--val-fraction", type=float, help="share of seen classes in a class-disjoint train/val split (default 0: none)"
    )
    a.add_argument(
        "--weights",
        help="ResNet-101 weights: imagenet (default; download), a local .h5 file, or none "
        "(random but seeded; for tests and the example)",
    )
    a.add_argument("--image-size", type=int, help="square input size (default 448 -> 14x14 maps)")
    a.add_argument("--batch-size", type=int, help="extraction batch size (default 16)")
    a.add_argument("--out", required=True, help="the prepared folder DATA_DIR")
    a.add_argument("--overwrite", action="store_true", help="replace an existing DATA_DIR/features.hdf5")
    a.add_argument("--restart", action="store_true", help="discard an unfinished extraction instead of resuming")
    a.add_argument("--no-progress", action="store_true", help="no progress bar while extracting features")
    a.set_defaults(func=cmd_prepare)

    r = sub.add_parser("run", help="train + evaluate + export on a prepared DATA_DIR")
    r.add_argument("--data-dir", required=True, help="folder made by prepare")
    r.add_argument("--out", required=True, help="run directory")
    r.add_argument("--export-dir", help="TF Serving model base path (default RUN_DIR/export); a new version is added")
    r.add_argument("--config", action="append", default=[], help="extra YAML config(s) after configs/custom.yaml")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    r.add_argument("--seed", type=int, help="shortcut for --set train.seed=N")
    r.add_argument("--iterations", type=int, help="shortcut for --set train.iterations=N")
    r.add_argument("--gamma", type=float, default=0.0, help="calibrated stacking for evaluation and the export")
    r.add_argument("--top-k", type=int, default=5, help="top-k of the export")
    r.add_argument("--no-export", action="store_true", help="train and evaluate only; no SavedModel")
    r.add_argument("--no-images", action="store_true", help="export without the serving_images signature")
    r.add_argument("--verify-export", action="store_true", help="reload the export with TF's C++ loader and compare")
    r.add_argument("--visualize", action="store_true", help="write an attention figure of one unseen test image")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("example", help="generated coloured shapes: prepare -> run -> serve -> query")
    e.add_argument("--out", required=True, help="work folder (source images, data, run, export)")
    e.add_argument("--image-size", type=int, default=96, help="backbone input size")
    e.add_argument("--classes", type=int, default=15, help="number of generated classes")
    e.add_argument("--images-per-class", type=int, default=12, help="generated images per class")
    e.add_argument("--seed", type=int, default=0, help="seed of the generated images and the run")
    e.add_argument("--top-k", type=int, default=3, help="top-k of the export")
    e.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config override (after the example's own: " + ", ".join(EXAMPLE_OVERRIDES) + ")",
    )
    e.add_argument("--no-serve", action="store_true", help="skip the query through the local gRPC test double")
    e.set_defaults(func=cmd_example)
    return p


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
