"""``python -m msdn_tf.prepare``: build or check a dataset's feature cache (:func:`msdn_tf.data.prepare.prepare`)."""

from __future__ import annotations

import json
from typing import Optional, Sequence

from msdn_tf.cli.common import CommandParser, cli_main
from msdn_tf.data.prepare import prepare


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = CommandParser(command="prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="dataset name (cub, sun, awa2, ...)")
    p.add_argument("--data-dir", required=True, help="folder with the dataset files (see README)")
    p.add_argument("--dtype", default=None, choices=["float16", "float32"], help="default data.cache_dtype")
    p.add_argument("--cache-dir", default=None, help="default data.cache_dir (else the feature file's folder)")
    p.add_argument("--feature-file", default=None, help="default data.feature_file (xlsa17 layout)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if the cache is up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from msdn_tf.config import resolve_config

    flags = [
        ("data.data_dir", args.data_dir, "--data-dir"),
        ("data.cache_dtype", args.dtype, "--dtype"),
        ("data.cache_dir", args.cache_dir, "--cache-dir"),
        ("data.feature_file", args.feature_file, "--feature-file"),
    ]
    config = resolve_config(args.dataset, (), args.set, flags=flags)
    summary = prepare(config, rebuild=args.rebuild, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0
