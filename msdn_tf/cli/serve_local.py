"""``python -m msdn_tf.serve_local``: run the local TEST DOUBLE of TF Serving (:mod:`msdn_tf.serving.local_server`)."""

from __future__ import annotations

from msdn_tf.cli.common import CommandParser, add_verbose_flag
from msdn_tf.serving.local_server import (
    DEFAULT_MAX_BATCH,
    DEFAULT_REQUEST_TIMEOUT,
    MAX_MESSAGE_BYTES,
    start_local_server,
)


def main(argv=None) -> int:
    import time

    parser = CommandParser(
        command="serve_local",
        description="Run a local TEST DOUBLE of TensorFlow Serving (not TF Serving itself).",
    )
    parser.add_argument("--model_base_path", required=True, help="folder of numbered versions (OUT of msdn_tf.export)")
    parser.add_argument("--model_name", required=True, help="the name clients ask for (model_spec.name)")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (0 = any free port)")
    parser.add_argument("--rest_api_port", type=int, default=8501, help="REST port (-1 = disabled)")
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
        help=f"largest request / declared tensor in bytes (default {MAX_MESSAGE_BYTES})",
    )
    parser.add_argument(
        "--request_timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        help=f"seconds a REST client may stay silent while sending its request (default {DEFAULT_REQUEST_TIMEOUT:g})",
    )
    args = add_verbose_flag(parser).parse_args(argv)
    handle = start_local_server(
        args.model_base_path,
        args.model_name,
        args.port,
        None if args.rest_api_port < 0 else args.rest_api_port,
        max_batch=args.max_batch_size,
        max_request_bytes=args.max_request_bytes,
        request_timeout=args.request_timeout,
    )
    print(f"TEST DOUBLE of TF Serving: {handle}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        handle.stop()
    return 0
