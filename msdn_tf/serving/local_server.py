"""A local TEST DOUBLE of TensorFlow Serving (gRPC PredictionService + REST).

This is NOT TensorFlow Serving.  No TF Serving binary is available in this
project's environment, so tests and local demos use this small Python stand-in
that speaks the same wire protocols for the parts msdn-tf uses:

* gRPC ``tensorflow.serving.PredictionService``: ``Predict`` and
  ``GetModelMetadata`` (``signature_def``).  ``Classify``, ``Regress`` and
  ``MultiInference`` answer UNIMPLEMENTED.
* REST, in TF Serving's JSON format: ``POST /v1/models/<name>[/versions/N]:predict``
  (row ``"instances"`` or columnar ``"inputs"``; binary strings as
  ``{"b64": ...}``), ``GET /v1/models/<name>[/versions/N]`` (status) and
  ``GET /v1/models/<name>[/versions/N]/metadata``.

It serves ONE model from a TF Serving model base path ``<base>/<version>/``
(the highest numeric version holding a ``saved_model.pb``), loaded with
``tf.saved_model.load`` -- i.e. the *Python* loader.  Whether the real (C++)
loader accepts the export must be checked separately with
:mod:`msdn_tf.serving.cc_loader`.

Status codes follow TF Serving: unknown model name/version -> NOT_FOUND;
unknown signature -> FAILED_PRECONDITION (TF Serving's "Serving signature key
... not found."); unknown/missing input, wrong dtype, wrong shape, unknown
output_filter alias, undecodable image (``tf.errors.InvalidArgumentError``
raised inside the signature) -> INVALID_ARGUMENT.  REST maps INVALID_ARGUMENT
and FAILED_PRECONDITION to HTTP 400 and NOT_FOUND to 404, with
``{"error": "..."}`` bodies.  A bad request never stops the server.

Limits (``start_local_server`` arguments / command-line flags): ``max_batch``
(``--max_batch_size``, 1024) caps every input's first dimension;
``max_request_bytes`` (``--max_request_bytes``, 256 MiB) caps the gRPC message, the
REST body and the size a gRPC ``TensorProto`` *declares* (checked before
``make_ndarray`` allocates it); ``request_timeout`` (``--request_timeout``, 30 s) is
the socket timeout of REST connections, so a body shorter than its Content-Length
ends in HTTP 408.  JSON nested deeper than 32 lists is a 400, and the REST listen
backlog is 128 (Python's default 5 stalls the 7th concurrent client by 1 s).

Both servers bind to 127.0.0.1 only.  Usage::

    handle = start_local_server("export/models/msdn", "msdn", rest_port=0)
    ... handle.grpc_address, handle.rest_url ...
    handle.stop()
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

__all__ = ["LocalServingHandle", "ServingError", "find_latest_version", "start_local_server"]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_BATCH = 1024  # samples per request (every input's first dimension)
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds a REST client may take to send its request
MAX_JSON_DEPTH = 32  # a tensor has at most 32 dimensions (numpy's limit too)
REST_LISTEN_BACKLOG = 128  # http.server's default 5 drops connections (1 s SYN retry) beyond 6 clients
DEFAULT_SIGNATURE = "serving_default"
_STRING_DTYPE = types_pb2.DT_STRING


class ServingError(Exception):
    """A request error of the TEST DOUBLE server, carrying the gRPC status code TF Serving would use."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _dtype_name(enum_value: int) -> str:
    return types_pb2.DataType.Name(enum_value)


def find_latest_version(model_base_path: str | os.PathLike) -> tuple[int, Path]:
    """Return ``(version, path)`` of the highest ``<base>/<int>/`` holding a saved_model.pb."""
    base = Path(model_base_path)
    if not base.is_dir():
        raise FileNotFoundError(f"model base path {base} does not exist or is not a directory")
    versions = [
        (int(p.name), p) for p in base.iterdir() if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").exists()
    ]
    if not versions:
        raise FileNotFoundError(
            f"no version directory with a saved_model.pb under {base} "
            "(TF Serving expects <model_base_path>/<version>/saved_model.pb, e.g. .../msdn/1/)"
        )
    return max(versions)


class _Servable:
    """One loaded model version of the TEST DOUBLE server (not TF Serving).

    Shared by the gRPC and REST front ends; every request error is a ServingError.
    """

    def __init__(
        self,
        model_name: str,
        model_base_path: str | os.PathLike,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_request_bytes: int = MAX_MESSAGE_BYTES,
    ):
        self.name = model_name
        self.max_batch = int(max_batch)
        self.max_request_bytes = int(max_request_bytes)
        self.version, self.path = find_latest_version(model_base_path)
        saved_model = saved_model_pb2.SavedModel()
        saved_model.ParseFromString((self.path / "saved_model.pb").read_bytes())
        meta_graphs = [mg for mg in saved_model.meta_graphs if "serve" in mg.meta_info_def.tags]
        if not meta_graphs:
            raise ValueError(f"{self.path} has no MetaGraph tagged 'serve'")
        self.signature_defs = dict(meta_graphs[0].signature_def)
        self.loaded = tf.saved_model.load(str(self.path), tags=["serve"])
        self.functions = dict(self.loaded.signatures)
        log.info("TEST DOUBLE server loaded %s version %d from %s", self.name, self.version, self.path)

    # -- lookup -----------------------------------------------------------
    def check_model(self, name: str, version: int | None, version_label: str = "") -> None:
        spec = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
        if name != self.name:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {spec}")
        if version_label:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"version label {version_label!r} not found (this test double serves no labels)",
            )
        if version is not None and version != self.version:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: {spec} (loaded version: {self.version})",
            )

    def signature(self, signature_name: str):
        name = signature_name or DEFAULT_SIGNATURE
        if name not in self.functions or name not in self.signature_defs:
            available = sorted(k for k in self.functions if not k.startswith("__"))
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{name}" not found. Available signatures: {available}',
            )
        return name, self.signature_defs[name], self.functions[name]

    # -- limits -----------------------------------------------------------
    def check_size(self, key: str, shape, itemsize: int) -> None:
        """Refuse a tensor over the batch or size limit BEFORE anything of that size is allocated."""
        shape = [int(d) for d in shape]
        if any(d < 0 for d in shape):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': negative dimension in shape {shape}")
        if shape and shape[0] > self.max_batch:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input '{key}': batch of {shape[0]} exceeds this server's limit of {self.max_batch} "
                "(--max_batch_size); split the request",
            )
        nbytes = int(np.prod(shape, dtype=object)) * int(itemsize)
        if nbytes > self.max_request_bytes:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input '{key}': shape {tuple(shape)} is {nbytes} bytes, over this server's limit of "
                f"{self.max_request_bytes} bytes (--max_request_bytes); split the request",
            )

    # -- predict ----------------------------------------------------------
    @staticmethod
    def _check_input(key: str, arr: np.ndarray, info) -> np.ndarray:
        want = tf.dtypes.as_dtype(info.dtype)
        if want == tf.string:
            if arr.dtype.kind not in "OSU":
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input '{key}': expects DT_STRING but got {arr.dtype} values",
                )
        else:
            try:
                got = tf.dtypes.as_dtype(arr.dtype)
            except TypeError:
                got = None
            if got != want:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input '{key}': expects {_dtype_name(info.dtype)} but "
                    f"{_dtype_name(got.as_datatype_enum) if got is not None else arr.dtype} is provided",
                )
        shape = info.tensor_shape
        if not shape.unknown_rank:
            want_dims = [d.size for d in shape.dim]
            ok = len(want_dims) == arr.ndim and all(w < 0 or w == g for w, g in zip(want_dims, arr.shape))
            if not ok:
                pretty = "(" + ", ".join("None" if w < 0 else str(w) for w in want_dims) + ")"
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input '{key}': expects shape {pretty} but got {tuple(arr.shape)}",
                )
        return arr

    def predict(
        self, signature_name: str, inputs: dict[str, np.ndarray], output_filter=()
    ) -> tuple[str, dict[str, np.ndarray]]:
        name, sig_def, fn = self.signature(signature_name)
        wanted, given = set(sig_def.inputs), set(inputs)
        if wanted != given:
            extra, missing = sorted(given - wanted), sorted(wanted - given)
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input keys do not match signature '{name}': expected {sorted(wanted)}"
                + (f"; unknown: {extra}" if extra else "")
                + (f"; missing: {missing}" if missing else ""),
            )
        outputs_wanted = list(output_filter) or sorted(sig_def.outputs)
        for alias in outputs_wanted:
            if alias not in sig_def.outputs:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} "
                    f"Outputs expected to be in the set {sorted(sig_def.outputs)}.",
                )
        if len(set(outputs_wanted)) != len(outputs_wanted):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias in {outputs_wanted}")
        feeds = {}
        for key, arr in inputs.items():
            info = sig_def.inputs[key]
            arr = self._check_input(key, arr, info)
            self.check_size(key, arr.shape, arr.itemsize)
            try:
                feeds[key] = tf.constant(arr, dtype=tf.dtypes.as_dtype(info.dtype))
            except (TypeError, ValueError) as exc:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': {exc}") from exc
        try:
            result = fn(**feeds)
        except tf.errors.OpError as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            for c in grpc.StatusCode:
                if c.value[0] == exc.error_code:
                    code = c
            raise ServingError(code, f"signature '{name}' failed: {exc.message}") from exc
        except (TypeError, ValueError) as exc:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"signature '{name}' rejected the inputs: {exc}"
            ) from exc
        return name, {alias: np.asarray(result[alias]) for alias in outputs_wanted}


# ---------------------------------------------------------------------- gRPC --


def _check_proto_size(servable: _Servable, key: str, proto) -> None:
    """The size a TensorProto DECLARES, checked before ``make_ndarray`` allocates it.

    A TensorProto may declare a shape and carry few or no values (TensorFlow fills the rest),
    so a 69-byte request can ask for gigabytes.
    """
    if proto.tensor_shape.unknown_rank:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': TensorProto has an unknown rank")
    shape = [d.size for d in proto.tensor_shape.dim]
    if proto.dtype == _STRING_DTYPE:
        itemsize = 8  # one object pointer per element; the bytes themselves are in the message
    else:
        try:
            itemsize = tf.dtypes.as_dtype(proto.dtype).size
        except TypeError as exc:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': unsupported dtype {proto.dtype}"
            ) from exc
    servable.check_size(key, shape, itemsize)


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """gRPC PredictionService of the TEST DOUBLE server (not TF Serving): Predict and GetModelMetadata."""

    def __init__(self, servable: _Servable):
        self.servable = servable

    @staticmethod
    def _version(spec) -> int | None:
        return spec.version.value if spec.HasField("version") else None

    def _abort(self, context, exc: Exception):
        if isinstance(exc, ServingError):
            context.abort(exc.code, exc.message)
        log.exception("TEST DOUBLE server: unexpected error")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def Predict(self, request, context):
        try:
            spec = request.model_spec
            self.servable.check_model(spec.name, self._version(spec), spec.version_label)
            inputs = {}
            for key, proto in request.inputs.items():
                _check_proto_size(self.servable, key, proto)
                try:
                    inputs[key] = tf.make_ndarray(proto)
                except Exception as exc:  # malformed TensorProto (size/shape mismatch, bad dtype)
                    raise ServingError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': cannot parse TensorProto: {exc}"
                    ) from exc
                if proto.dtype == _STRING_DTYPE:
                    inputs[key] = inputs[key].astype(object)
            name, outputs = self.servable.predict(spec.signature_name, inputs, list(request.output_filter))
            response = predict_pb2.PredictResponse()
            response.model_spec.name = self.servable.name
            response.model_spec.version.value = self.servable.version
            response.model_spec.signature_name = name
            for alias, arr in outputs.items():
                response.outputs[alias].CopyFrom(tf.make_tensor_proto(arr))
            return response
        except Exception as exc:
            self._abort(context, exc)

    def GetModelMetadata(self, request, context):
        try:
            spec = request.model_spec
            self.servable.check_model(spec.name, self._version(spec), spec.version_label)
            fields = list(request.metadata_field)
            if not fields:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "GetModelMetadataRequest must specify at least one metadata_field",
                )
            unsupported = [f for f in fields if f != "signature_def"]
            if unsupported:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {unsupported[0]} is not supported"
                )
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = self.servable.name
            response.model_spec.version.value = self.servable.version
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for key, sig in self.servable.signature_defs.items():
                sig_map.signature_def[key].CopyFrom(sig)
            response.metadata["signature_def"].Pack(sig_map)
            return response
        except Exception as exc:
            self._abort(context, exc)


# ---------------------------------------------------------------------- REST --

_PREDICT_RE = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")
_MODEL_RE = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata)?$")
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.DEADLINE_EXCEEDED: 408,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}


def _bad(msg: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def _decode_strings(value, key: str):
    """JSON value -> nested lists of bytes ({"b64": ...} decoded, str UTF-8 encoded)."""
    if isinstance(value, list):
        return [_decode_strings(v, key) for v in value]
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise _bad(f'input \'{key}\': a JSON object in a string tensor must be {{"b64": "..."}}')
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError as exc:
            raise _bad(f"input '{key}': invalid base64: {exc}") from exc
    if isinstance(value, str):
        return value.encode("utf-8")
    raise _bad(f"input '{key}': expects strings, got {type(value).__name__}")


def _json_depth(value, limit: int) -> int:
    """Nesting depth of JSON lists along the first elements, stopping past ``limit``."""
    depth = 0
    while isinstance(value, list) and depth <= limit:
        depth += 1
        value = value[0] if value else None
    return depth


def _json_to_array(value, info, key: str) -> np.ndarray:
    dtype = tf.dtypes.as_dtype(info.dtype)
    if _json_depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise _bad(
            f"input '{key}': JSON lists nested more than {MAX_JSON_DEPTH} deep; a tensor has at most "
            f"{MAX_JSON_DEPTH} dimensions"
        )
    try:
        if dtype == tf.string:
            return np.array(_decode_strings(value, key), dtype=object)
        raw = np.asarray(value)
    except ServingError:
        raise
    except ValueError as exc:  # ragged lists
        raise _bad(f"input '{key}': values do not form a rectangular tensor: {exc}") from exc
    kind = raw.dtype.kind
    if raw.size and (
        (dtype.is_bool and kind != "b")
        or (dtype.is_integer and kind not in "iu")
        or (dtype.is_floating and kind not in "iuf")
    ):
        raise _bad(f"input '{key}': expects {_dtype_name(info.dtype)} but got JSON values of numpy kind {raw.dtype}")
    try:
        with np.errstate(over="ignore"):  # out-of-range numbers become inf, refused inside the signature
            return raw.astype(dtype.as_numpy_dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"input '{key}': cannot convert to {_dtype_name(info.dtype)}: {exc}") from exc


def _array_to_json(arr: np.ndarray, alias: str):
    if arr.dtype == object or arr.dtype.kind == "S":
        as_b64 = alias.endswith("_bytes")

        def conv(x):
            if isinstance(x, list):
                return [conv(v) for v in x]
            if as_b64:
                return {"b64": base64.b64encode(x).decode("ascii")}
            return x.decode("utf-8", errors="replace")

        return conv(arr.tolist())
    return arr.tolist()


def _rest_predict(servable: _Servable, name: str, version: int | None, body: bytes):
    servable.check_model(name, version)
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise _bad("request body is JSON nested too deeply to parse") from exc
    if not isinstance(req, dict):
        raise _bad("request body must be a JSON object")
    if ("instances" in req) == ("inputs" in req):
        raise _bad('request must contain exactly one of "instances" (row format) or "inputs" (columnar format)')
    sig_name = req.get("signature_name") or DEFAULT_SIGNATURE
    if not isinstance(sig_name, str):
        raise _bad('"signature_name" must be a string')
    sig_name, sig_def, _ = servable.signature(sig_name)
    input_keys = sorted(sig_def.inputs)

    if "instances" in req:
        instances = req["instances"]
        if not isinstance(instances, list) or not instances:
            raise _bad('"instances" must be a non-empty list')
        if all(isinstance(i, dict) and "b64" not in i for i in instances):
            columns: dict[str, list] = {}
            for inst in instances:
                if set(inst) != set(columns or inst):
                    raise _bad("all instances must have the same input keys")
                for k, v in inst.items():
                    columns.setdefault(k, []).append(v)
        elif len(input_keys) == 1:
            columns = {input_keys[0]: instances}
        else:
            raise _bad(f"signature '{sig_name}' has several inputs {input_keys}; each instance must be an object")
        row_format = True
    else:
        inputs = req["inputs"]
        if isinstance(inputs, dict) and "b64" not in inputs:
            columns = inputs
        elif len(input_keys) == 1:
            columns = {input_keys[0]: inputs}
        else:
            raise _bad(f"signature '{sig_name}' has several inputs {input_keys}; \"inputs\" must be an object")
        row_format = False

    arrays = {}
    for key, value in columns.items():
        if key not in sig_def.inputs:
            raise _bad(f"input keys do not match signature '{sig_name}': expected {input_keys}; unknown: ['{key}']")
        arrays[key] = _json_to_array(value, sig_def.inputs[key], key)
    _, outputs = servable.predict(sig_name, arrays)
    aliases = sorted(outputs)
    if row_format:
        n = {len(a) if a.ndim else -1 for a in outputs.values()}
        if len(n) != 1 or -1 in n:
            raise _bad('outputs have different batch sizes; use the columnar "inputs" format')
        if len(aliases) == 1:
            return {"predictions": _array_to_json(outputs[aliases[0]], aliases[0])}
        cols = {a: _array_to_json(outputs[a], a) for a in aliases}
        return {"predictions": [{a: cols[a][i] for a in aliases} for i in range(n.pop())]}
    if len(aliases) == 1:
        return {"outputs": _array_to_json(outputs[aliases[0]], aliases[0])}
    return {"outputs": {a: _array_to_json(outputs[a], a) for a in aliases}}


class _RestServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a listen backlog for many concurrent clients (not 5)."""

    request_queue_size = REST_LISTEN_BACKLOG
    daemon_threads = True


def _read_request_body(handler: BaseHTTPRequestHandler, max_bytes: int, request_timeout: float) -> bytes:
    """The body of a REST request, by its Content-Length; errors for a missing, bad, too large or short one.

    Each read waits at most ``request_timeout`` (the socket timeout); a body that stops short is
    DEADLINE_EXCEEDED (HTTP 408). A refused body closes the connection.
    """
    text = handler.headers.get("Content-Length")
    if text is None:
        handler.close_connection = True
        if handler.headers.get("Transfer-Encoding"):
            raise _bad("chunked request bodies are not supported; send a Content-Length")
        return b""
    try:
        length = int(text)
        if length < 0:
            raise ValueError
    except ValueError:
        handler.close_connection = True
        raise _bad(f"invalid Content-Length {text!r}") from None
    if length > max_bytes:
        handler.close_connection = True
        raise _bad(f"request body too large ({length} > {max_bytes} bytes, --max_request_bytes)")
    chunks, got = [], 0
    try:
        while got < length:  # each read waits at most request_timeout (the socket timeout)
            chunk = handler.rfile.read1(min(1 << 20, length - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except TimeoutError:
        pass
    body = b"".join(chunks)
    if len(body) < length:
        handler.close_connection = True
        raise ServingError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"request body incomplete: got {len(body)} of {length} bytes "
            f"(Content-Length); nothing more arrived within {request_timeout:g} s",
        )
    return body


def _metadata_payload(servable: _Servable) -> dict:
    """``GET /v1/models/<name>/metadata``: the signature defs, as TF Serving's JSON."""
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in servable.signature_defs.items():
        sig_map.signature_def[key].CopyFrom(sig)
    return {
        "model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
        "metadata": {"signature_def": json_format.MessageToDict(sig_map)},
    }


def _status_payload(servable: _Servable) -> dict:
    """``GET /v1/models/<name>``: the model version status, as TF Serving's JSON."""
    return {
        "model_version_status": [
            {
                "version": str(servable.version),
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }


def _make_rest_handler(servable: _Servable, request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
    class _RestHandler(BaseHTTPRequestHandler):
        """REST front end of the TEST DOUBLE server (not TF Serving), TF Serving's JSON format."""

        protocol_version = "HTTP/1.1"
        timeout = request_timeout  # socket timeout: a body shorter than its Content-Length ends in 408

        def log_message(self, fmt, *args):  # keep test output quiet
            log.debug("TEST DOUBLE REST: " + fmt, *args)

        def _send(self, status: int, payload) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, exc: Exception) -> None:
            if isinstance(exc, ServingError):
                self._send(_HTTP_STATUS.get(exc.code, 500), {"error": exc.message})
            else:
                log.exception("TEST DOUBLE REST: unexpected error")
                self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

        def _read_body(self) -> bytes:
            return _read_request_body(self, servable.max_request_bytes, request_timeout)

        def do_POST(self):
            try:
                body = self._read_body()
                m = _PREDICT_RE.match(self.path.split("?", 1)[0])
                if not m:
                    raise ServingError(
                        grpc.StatusCode.NOT_FOUND,
                        f"unsupported path {self.path}; use /v1/models/<name>[/versions/<n>]:predict",
                    )
                version = int(m.group(2)) if m.group(2) else None
                self._send(200, _rest_predict(servable, m.group(1), version, body))
            except Exception as exc:
                self._error(exc)

        def do_GET(self):
            try:
                m = _MODEL_RE.match(self.path.split("?", 1)[0])
                if not m:
                    raise ServingError(grpc.StatusCode.NOT_FOUND, f"unsupported path {self.path}")
                version = int(m.group(2)) if m.group(2) else None
                servable.check_model(m.group(1), version)
                payload = _metadata_payload(servable) if m.group(3) else _status_payload(servable)
                self._send(200, payload)
            except Exception as exc:
                self._error(exc)

    return _RestHandler


# -------------------------------------------------------------------- handle --


class LocalServingHandle:
    """A running TEST DOUBLE server (not TF Serving): ``grpc_address``, ``rest_url`` (or None), ``stop()``."""

    def __init__(self, servable: _Servable, grpc_server, grpc_port: int, http_server=None, http_thread=None):
        self.servable = servable
        self.model_name = servable.name
        self.version = servable.version
        self._grpc_server = grpc_server
        self._http_server = http_server
        self._http_thread = http_thread
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        self.rest_url = f"http://127.0.0.1:{http_server.server_address[1]}" if http_server else None

    def stop(self, grace: float | None = 1.0) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_thread.join(timeout=5)
            self._http_server = None
        if self._grpc_server is not None:
            self._grpc_server.stop(grace).wait(timeout=10)
            self._grpc_server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return (
            f"LocalServingHandle(TEST DOUBLE of TF Serving, model={self.model_name!r}, version={self.version}, "
            f"grpc={self.grpc_address}, rest={self.rest_url})"
        )


def start_local_server(
    model_base_path: str | os.PathLike,
    model_name: str,
    grpc_port: int = 0,
    rest_port: int | None = None,
    *,
    max_workers: int = 4,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_request_bytes: int = MAX_MESSAGE_BYTES,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> LocalServingHandle:
    """Start the TEST DOUBLE of TF Serving on 127.0.0.1 and return its handle.

    Args:
        model_base_path: TF Serving layout ``<base>/<version>/saved_model.pb``; the highest
            version is served.
        model_name: the name clients put in ``model_spec.name`` / the REST URL.
        grpc_port: 0 picks a free port.
        rest_port: None disables REST; 0 picks a free port.
        max_batch: the largest first dimension of any input (larger: INVALID_ARGUMENT / 400).
        max_request_bytes: the largest request (gRPC message, REST body) and the largest
            tensor a request may declare, in bytes.
        request_timeout: seconds a REST client may take to send its request line, headers
            and body (an incomplete body: HTTP 408).
    """
    servable = _Servable(model_name, model_base_path, max_batch=max_batch, max_request_bytes=max_request_bytes)
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", int(max_request_bytes)),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_PredictionService(servable), server)
    port = server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    if port == 0:
        raise OSError(f"could not bind the gRPC server to 127.0.0.1:{grpc_port}")
    server.start()
    http_server = http_thread = None
    if rest_port is not None:
        try:
            http_server = _RestServer(("127.0.0.1", rest_port), _make_rest_handler(servable, request_timeout))
        except OSError:
            server.stop(None)
            raise
        http_thread = threading.Thread(target=http_server.serve_forever, name="tfserving-test-double-rest", daemon=True)
        http_thread.start()
    return LocalServingHandle(servable, server, port, http_server, http_thread)
