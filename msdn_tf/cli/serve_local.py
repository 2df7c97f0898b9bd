"""``python -m msdn_tf.serve_local``: run the local TEST DOUBLE of TF Serving (:mod:`msdn_tf.serving.local_server`).

The flags are TF Serving's (``tensorflow_model_server``) where they exist: ``--port`` (gRPC,
default 8500, 0 disables it), ``--rest_api_port`` (default 0: REST off, as in TF Serving),
``--file_system_poll_wait_seconds``, ``--rest_api_num_threads``, ``--grpc_max_threads``.
A missing or damaged model and a busy port are one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import argparse

from msdn_tf.cli.common import CommandParser, cli_main
from msdn_tf.errors import MSDNError
from msdn_tf.serving.local_server import (
    DEFAULT_GRPC_THREADS,
    DEFAULT_MAX_BATCH,
    DEFAULT_POLL_SECONDS,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_REST_THREADS,
    MAX_MESSAGE_BYTES,
    start_local_server,
)


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        command="serve_local",
        description="Run a local TEST DOUBLE of TensorFlow Serving (not TF Serving itself) on 127.0.0.1.",
    )
    parser.add_argument("--model_base_path", required=True, help="TF Serving layout: <path>/<version>/saved_model.pb")
    parser.add_argument("--model_name", required=True, help="the model name clients ask for")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port; 0 disables gRPC (default 8500)")
    parser.add_argument(
        "--rest_api_port", type=int, default=0, help="REST port; 0 disables REST, as in TF Serving (default 0)"
    )
    parser.add_argument(
        "--file_system_poll_wait_seconds",
        type=float,
        default=DEFAULT_POLL_SECONDS,
        help="seconds between two looks at --model_base_path for new or removed versions; 0: only at start "
        f"(default {DEFAULT_POLL_SECONDS:g})",
    )
    parser.add_argument(
        "--max_batch_size",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help=f"largest batch a request may send (default {DEFAULT_MAX_BATCH})",
    )
    parser.add_argument(
        "--max_request_bytes",
        type=int,
        default=MAX_MESSAGE_BYTES,
        help="largest request, and most bytes the tensors of one request may declare together; a REST body may "
        f"hold at most this / 48 JSON values (default {MAX_MESSAGE_BYTES})",
    )
    parser.add_argument(
        "--request_timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        help=f"seconds a REST client may stay silent while sending its request (default {DEFAULT_REQUEST_TIMEOUT:g})",
    )
    parser.add_argument(
        "--rest_api_num_threads",
        type=int,
        default=DEFAULT_REST_THREADS,
        help=f"REST connections served at once; more wait (default {DEFAULT_REST_THREADS})",
    )
    parser.add_argument(
        "--grpc_max_threads",
        type=int,
        default=DEFAULT_GRPC_THREADS,
        help=f"gRPC handler threads; 4x as many calls are queued (default {DEFAULT_GRPC_THREADS})",
    )
    return parser


def _check(args) -> None:
    for flag in ("port", "rest_api_port"):
        value = getattr(args, flag)
        if not 0 <= value <= 65535:
            raise MSDNError(f"--{flag} {value}: a port is 0..65535 (0 disables it)")
    if args.port == 0 and args.rest_api_port == 0:
        raise MSDNError("--port 0 and --rest_api_port 0 disable both gRPC and REST: give one of them a port")
    if args.port == args.rest_api_port:
        raise MSDNError(f"--port and --rest_api_port are both {args.port}: they must differ (as in TF Serving)")
    for flag in ("max_batch_size", "max_request_bytes", "rest_api_num_threads", "grpc_max_threads"):
        if getattr(args, flag) < 1:
            raise MSDNError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not args.request_timeout > 0:
        raise MSDNError(f"--request_timeout must be > 0 seconds, got {args.request_timeout}")
    if not args.file_system_poll_wait_seconds >= 0:
        raise MSDNError(f"--file_system_poll_wait_seconds must be >= 0, got {args.file_system_poll_wait_seconds}")


@cli_main
def main(argv=None) -> int:
    import time

    args = _parser().parse_args(argv)
    _check(args)
    handle = start_local_server(
        args.model_base_path,
        args.model_name,
        args.port or None,
        args.rest_api_port or None,
        max_workers=args.grpc_max_threads,
        max_batch=args.max_batch_size,
        max_request_bytes=args.max_request_bytes,
        request_timeout=args.request_timeout,
        poll_seconds=args.file_system_poll_wait_seconds,
        rest_threads=args.rest_api_num_threads,
    )
    print(f"TEST DOUBLE of TF Serving: {handle}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        handle.stop()
    return 0
