"""Command: query an exported MSDN served by TensorFlow Serving, over gRPC or REST.

Usage::

    python -m msdn_tf.client --server localhost:8500 --model msdn_cub \\
        (--features FILE.npy|FILE.hdf5 [--rows 0 5 9] | --images a.jpg b.png ...) \\
        [--rest http://localhost:8501] [--top-k 5] \\
        [--metadata export/models/msdn_cub/msdn_metadata.json] [--version N] [--json]

What it prints and the errors it reports: :mod:`msdn_tf.serving.classify`. Every error is one
``error:`` line and exit code 2. The REST path (``--rest``) does not import TensorFlow.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from msdn_tf.cli.common import CommandParser, cli_main
from msdn_tf.errors import MSDNError
from msdn_tf.serving.classify import (
    check_metadata,
    classify,
    fetch_metadata,
    format_text,
    read_features,
    read_images,
)

# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(command="client", description="Classify features or images with an MSDN served by TF Serving.")
    p.add_argument("--server", default="localhost:8500", help="gRPC address host:port")
    p.add_argument("--rest", default=None, help="use TF Serving's REST API at this URL, e.g. http://localhost:8501")
    p.add_argument("--model", required=True, help="model name in the server's model config, e.g. msdn_cub")
    p.add_argument("--version", type=int, default=None, help="model version (default: the latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help=".npy (B,R,F)/(B,H,W,F) or feature-map .hdf5")
    src.add_argument("--images", nargs="+", help="encoded JPEG/PNG files (needs an export made --with-images)")
    p.add_argument("--rows", nargs="+", type=int, default=None, help="rows of --features to send")
    p.add_argument("--top-k", type=int, default=None, help="how many classes to print (default: the export's)")
    p.add_argument(
        "--metadata",
        default=None,
        help="msdn_metadata.json written by the export (default: ask the server's metadata signature)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer (default 30)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.top_k is not None and args.top_k < 1:
        raise MSDNError(f"--top-k must be >= 1, got {args.top_k}")
    if not args.timeout > 0:
        raise MSDNError(f"--timeout must be > 0 seconds, got {args.timeout}")
    from msdn_tf.serving.export import read_metadata

    metadata = (
        check_metadata(read_metadata(args.metadata), str(args.metadata))
        if args.metadata
        else fetch_metadata(
            model=args.model, server=args.server, rest=args.rest, version=args.version, timeout=args.timeout
        )
    )
    if args.images:
        answer = classify(
            model=args.model,
            server=args.server,
            rest=args.rest,
            images=read_images(args.images),
            metadata=metadata,
            top_k=args.top_k,
            version=args.version,
            labels=list(args.images),
            timeout=args.timeout,
        )
    else:
        x = read_features(args.features, args.rows, metadata.get("feature_dim"))
        labels = [
            f"{args.features}[{r}]"
            for r in (args.rows or ([0] if args.features.lower().endswith((".hdf5", ".h5")) else range(len(x))))
        ]
        answer = classify(
            model=args.model,
            server=args.server,
            rest=args.rest,
            features=x,
            metadata=metadata,
            top_k=args.top_k,
            version=args.version,
            labels=labels,
            timeout=args.timeout,
        )
    print(json.dumps(answer, indent=2) if args.json else format_text(answer))
    return 0
