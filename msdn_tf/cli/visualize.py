"""Command: see what a trained MSDN attends to: ``python -m msdn_tf.visualize {attention,embeddings}``.

Usage::

    python -m msdn_tf.visualize attention --run RUN (--index 0 --split test_unseen | --image bird.jpg) [--out fig.png]
    python -m msdn_tf.visualize embeddings --run RUN [--split test] [--out DIR]

What each writes: the library, :mod:`msdn_tf.viz.run_figures`, and ``docs/visualize.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from msdn_tf.cli.common import CommandParser, cli_main
from msdn_tf.viz.run_figures import attention_text, embeddings_text, visualize_attention, visualize_embeddings


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(command="visualize", description="Attention maps and embeddings of a trained MSDN run.")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("attention", help="top-k attributes of one image with both sub-nets' attention maps")
    a.add_argument("--run", required=True, help="run directory (config.yaml + model.keras)")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="an image file (runs the backbone; maps overlaid on the image)")
    src.add_argument("--index", type=int, help="N-th image (0-based) of --split (features only: region grid)")
    a.add_argument("--split", default="test_unseen", help="with --index: test_unseen (default), test_seen, trainval")
    a.add_argument("--top-k", type=int, default=6, help="attributes shown")
    a.add_argument(
        "--rank-by",
        default="fused",
        choices=["fused", "a2v", "v2a"],
        help="rank attributes by the fused score w1*A->V + w2*V->A (default), or one sub-net's",
    )
    a.add_argument(
        "--backbone-weights",
        default="imagenet",
        help="with --image: 'imagenet' (Keras download), a local .h5/.weights.h5 file, or 'none'",
    )
    a.add_argument("--image-size", type=int, default=448, help="with --image: input size (448 -> 14x14 maps)")
    a.add_argument("--true-class", help="with --image: its class id or name (reported in the JSON)")
    a.add_argument("--out", help="PNG path (the JSON is written beside it)")
    a.add_argument("--json", action="store_true", help="print the summary as JSON instead of a few readable lines")

    e = sub.add_parser("embeddings", help="TensorBoard projector files and a static t-SNE of attribute scores")
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument(
        "--split", default="test", help="test (default: test_seen + test_unseen), test_unseen, test_seen or trainval"
    )
    e.add_argument("--max-per-class", type=int, help="at most N images per class")
    e.add_argument("--kind", default="fused", choices=["fused", "a2v", "v2a"], help="attribute scores embedded")
    e.add_argument(
        "--method",
        default="auto",
        choices=["auto", "tsne", "pca"],
        help="static figure projection (auto: t-SNE if scikit-learn is installed, else PCA)",
    )
    e.add_argument("--seed", type=int, default=0, help="seed of the row sample and the t-SNE projection")
    e.add_argument("--out", help="output folder (default RUN/tensorboard/embeddings_<split>)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--json", action="store_true", help="print the summary as JSON instead of a few readable lines")
    return p


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731  (stdout carries the JSON)
    if args.command == "attention":
        summary = visualize_attention(
            args.run,
            image=args.image,
            index=args.index,
            split=args.split,
            top_k=args.top_k,
            rank_by=args.rank_by,
            out=args.out,
            backbone_weights=args.backbone_weights,
            image_size=args.image_size,
            true_class=args.true_class,
            log=log,
        )
    else:
        summary = visualize_embeddings(
            args.run,
            split=args.split,
            max_per_class=args.max_per_class,
            out=args.out,
            kind=args.kind,
            method=args.method,
            seed=args.seed,
            progress=not args.no_progress,
            log=log,
        )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(attention_text(summary) if args.command == "attention" else embeddings_text(summary))
    return 0
