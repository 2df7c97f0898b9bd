"""``python -m msdn_tf.cc_loader``: load a SavedModel with TensorFlow's C++ loader, as TF Serving does.

The library is :mod:`msdn_tf.serving.cc_loader`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from msdn_tf.cli.common import CommandParser, add_verbose_flag
from msdn_tf.serving.cc_loader import (
    CcLoaderError,
    CcLoaderUnavailable,
    compile_loader,
    inspect_saved_model,
    outputs_report,
    run_signature,
)


def _parse_input(spec: str):
    eq, at = spec.find("="), spec.find("@")
    if eq > 0 and (at < 0 or eq < at):
        return spec[:eq], np.load(spec[eq + 1 :], allow_pickle=False)
    if at > 0:
        return spec[:at], Path(spec[at + 1 :]).read_bytes()
    raise SystemExit(f"bad --input {spec!r}: use name=file.npy or name@raw_bytes_file")


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        command="cc_loader",
        description="Load a SavedModel with TensorFlow's C++ loader (as TF Serving does), "
        "list its signatures and optionally run one.",
    )
    parser.add_argument("export_dir", nargs="?", help="SavedModel directory (e.g. export/models/msdn/1)")
    parser.add_argument("--signature", help="signature to run (omit to only list signatures)")
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="SPEC",
        help="name=file.npy for a numeric input, or name@file for one element of a 1-D string "
        "input (repeat per batch element, in order)",
    )
    parser.add_argument("--out", help="directory to write outputs to as <key>.npy")
    parser.add_argument("--cache-dir", help="where to cache the compiled loader")
    parser.add_argument("--compile-only", action="store_true", help="build the loader and print its path")
    args = add_verbose_flag(parser).parse_args(argv)

    try:
        binary = compile_loader(args.cache_dir)
        if args.compile_only:
            print(binary)
            return 0
        if not args.export_dir:
            parser.error("EXPORT_DIR is required")
        if not args.signature:
            if args.input:
                parser.error("--input needs --signature")
            print(json.dumps(inspect_saved_model(args.export_dir, binary=binary), indent=2))
            return 0
        inputs: dict = {}
        for spec in args.input:
            name, value = _parse_input(spec)
            if isinstance(value, bytes):
                inputs.setdefault(name, []).append(value)
            elif name in inputs:
                parser.error(f"input {name!r} given twice")
            else:
                inputs[name] = value
        outputs = run_signature(args.export_dir, args.signature, inputs, binary=binary)
        print(json.dumps(outputs_report(outputs, args.out), indent=2))
        return 0
    except (CcLoaderUnavailable, CcLoaderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
