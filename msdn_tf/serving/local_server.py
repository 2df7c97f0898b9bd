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

* gRPC ``tensorflow.serving.ModelService``: ``GetModelStatus`` (``HandleReloadConfigRequest``
  answers UNIMPLEMENTED).

It serves ONE model name from a TF Serving model base path ``<base>/<version>/``
with TF Serving's default version policy (the highest numeric version holding a
``saved_model.pb``), loaded with ``tf.saved_model.load`` -- i.e. the *Python* loader.
Whether the real (C++) loader accepts the export must be checked separately with
:mod:`msdn_tf.serving.cc_loader`.  Like TF Serving, it polls the base path every
``poll_seconds`` (``--file_system_poll_wait_seconds``, default 1; 0: once at start):
a new highest version is loaded and then replaces the served one, a removed version
is unloaded (status END), a version that fails to load leaves the served one in place.

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
REST body, and the bytes the tensors of one request *declare*, summed over all its
inputs (checked before ``make_ndarray`` allocates any of them); a REST body may hold
at most ``max_request_bytes / 48`` JSON values (a parsed JSON number costs 32 bytes in
Python and 8 + 4 more as arrays: counted in the raw body before it is parsed); ``request_timeout``
(``--request_timeout``, 30 s) is the socket timeout of REST connections, so a body
shorter than its Content-Length ends in HTTP 408.  JSON nested deeper than 32 lists is
a 400; the REST listen backlog is 128 (Python's default 5 stalls the 7th concurrent
client by 1 s) and at most ``rest_threads`` (``--rest_api_num_threads``, 16) connections
are served at once (more wait in the backlog; after ``request_timeout`` they get 503).
gRPC runs ``max_workers`` (``--grpc_max_threads``, 4) handler threads and queues at
most ``4 * max_workers`` calls (more: RESOURCE_EXHAUSTED).  Ports are bound exclusively
(no ``SO_REUSEPORT``): a busy port is an error, not a second server sharing it.

Both servers bind to 127.0.0.1 only.  Usage::

    handle = start_local_server("export/models/msdn", "msdn", rest_port=0)  # 0: any free port
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
import urllib.parse
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from msdn_tf.errors import MSDNError

__all__ = [
    "LocalServingHandle",
    "ModelLoadError",
    "ServingError",
    "find_latest_version",
    "list_versions",
    "start_local_server",
]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_BATCH = 1024  # samples per request (every input's first dimension)
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds a REST client may take to send its request
DEFAULT_POLL_SECONDS = 1.0  # TF Serving's --file_system_poll_wait_seconds default
DEFAULT_REST_THREADS = 16  # connections served at once (TF Serving: --rest_api_num_threads)
DEFAULT_GRPC_THREADS = 4  # gRPC handler threads (TF Serving: --grpc_max_threads)
JSON_VALUE_BYTES = 48  # one JSON number: a float object and its list slot (32 B), then float64 and tensor copies
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


class ModelLoadError(MSDNError):
    """A model version could not be loaded (missing base path, no version, a corrupt SavedModel)."""


def _dtype_name(enum_value: int) -> str:
    return types_pb2.DataType.Name(enum_value)


def list_versions(model_base_path: str | os.PathLike) -> dict[int, Path]:
    """``{version: path}`` of every ``<base>/<int>/`` holding a saved_model.pb (TF Serving's layout)."""
    base = Path(model_base_path)
    if not base.is_dir():
        raise ModelLoadError(f"model base path {base} does not exist or is not a directory")
    try:
        entries = list(base.iterdir())
    except OSError as exc:
        raise ModelLoadError(f"model base path {base}: cannot list it ({exc.strerror})") from exc
    return {int(p.name): p for p in entries if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").is_file()}


def find_latest_version(model_base_path: str | os.PathLike) -> tuple[int, Path]:
    """Return ``(version, path)`` of the highest ``<base>/<int>/`` holding a saved_model.pb."""
    versions = list_versions(model_base_path)
    if not versions:
        raise ModelLoadError(
            f"no version directory with a saved_model.pb under {model_base_path} "
            "(TF Serving expects <model_base_path>/<version>/saved_model.pb, e.g. .../msdn/1/)"
        )
    return max(versions.items())


class _Servable:
    """One loaded model version of the TEST DOUBLE server (not TF Serving).

    Shared by the gRPC and REST front ends; every request error is a ServingError.
    """

    def __init__(
        self,
        model_name: str,
        version: int,
        path: Path,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_request_bytes: int = MAX_MESSAGE_BYTES,
    ):
        self.name = model_name
        self.max_batch = int(max_batch)
        self.max_request_bytes = int(max_request_bytes)
        self.version, self.path = int(version), Path(path)
        saved_model = saved_model_pb2.SavedModel()
        try:
            saved_model.ParseFromString((self.path / "saved_model.pb").read_bytes())
        except OSError as exc:
            raise ModelLoadError(f"{self.path / 'saved_model.pb'}: cannot read ({exc.strerror})") from exc
        except Exception as exc:  # google.protobuf.message.DecodeError
            raise ModelLoadError(
                f"{self.path / 'saved_model.pb'}: not a SavedModel (the protocol buffer does not parse: {exc})"
            ) from exc
        meta_graphs = [mg for mg in saved_model.meta_graphs if "serve" in mg.meta_info_def.tags]
        if not meta_graphs:
            raise ModelLoadError(f"{self.path}: the SavedModel has no MetaGraph tagged 'serve'")
        self.signature_defs = dict(meta_graphs[0].signature_def)
        try:
            self.loaded = tf.saved_model.load(str(self.path), tags=["serve"])
        except Exception as exc:  # tf.errors.OpError, ValueError, ... of a damaged SavedModel
            first = " ".join(str(getattr(exc, "message", exc)).split())[:300]
            raise ModelLoadError(f"{self.path}: the SavedModel does not load ({type(exc).__name__}: {first})") from exc
        self.functions = dict(self.loaded.signatures)
        log.info("TEST DOUBLE server loaded %s version %d from %s", self.name, self.version, self.path)

    # -- lookup -----------------------------------------------------------
    def signature(self, signature_name: str):
        name = signature_name or DEFAULT_SIGNATURE
        if name not in self.functions or name not in self.signature_defs:
            available = sorted(k for k in self.functions if not k.startswith("__"))
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{name}" not found. Available signatures: {available}',
            )
        return name, self.signature_defs[name], self.functions[name]

    @staticmethod
    def check_keys(name: str, sig_def, given) -> None:
        """The request's input keys must be the signature's (checked before any tensor is built)."""
        wanted, given = set(sig_def.inputs), set(given)
        if wanted != given:
            extra, missing = sorted(given - wanted), sorted(wanted - given)
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input keys do not match signature '{name}': expected {sorted(wanted)}"
                + (f"; unknown: {extra}" if extra else "")
                + (f"; missing: {missing}" if missing else ""),
            )

    # -- limits -----------------------------------------------------------
    def check_total(self, sizes: dict) -> None:
        """The bytes of all inputs of one request together (``{key: bytes}``) within ``max_request_bytes``."""
        total = sum(sizes.values())
        if total > self.max_request_bytes:
            parts = ", ".join(f"'{k}' {n}" for k, n in sorted(sizes.items()))
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the inputs of this request declare {total} bytes together ({parts}), over this server's "
                f"limit of {self.max_request_bytes} bytes per request (--max_request_bytes); split the request",
            )

    def check_size(self, key: str, shape, itemsize: int) -> int:
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
        return nbytes

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
        self.check_keys(name, sig_def, inputs)
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
        feeds, sizes = {}, {}
        for key, arr in inputs.items():
            info = sig_def.inputs[key]
            arr = self._check_input(key, arr, info)
            sizes[key] = self.check_size(key, arr.shape, arr.itemsize)
        self.check_total(sizes)
        for key, arr in inputs.items():
            info = sig_def.inputs[key]
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


# -------------------------------------------------------------- versions --

_State = get_model_status_pb2.ModelVersionStatus


class _Model:
    """The versions of one model name, as TF Serving's default policy serves them (the latest one).

    ``poll()`` looks at the base path: a new highest version is loaded, then replaces the
    served one (which is unloaded, state END); when the served version's folder is
    removed, the highest remaining one is loaded (or none is served). A version that
    fails to load keeps its error in the status and is not retried; the served version
    stays. A thread calls ``poll()`` every ``poll_seconds`` (0: only at start).
    """

    def __init__(self, name: str, base_path, *, poll_seconds: float = DEFAULT_POLL_SECONDS, **servable_kwargs):
        self.name = name
        self.base = Path(base_path)
        self.poll_seconds = float(poll_seconds)
        self._kwargs = servable_kwargs
        self.max_request_bytes = int(servable_kwargs.get("max_request_bytes", MAX_MESSAGE_BYTES))
        self._lock = threading.Lock()
        self._current: _Servable | None = None
        self.states: dict[int, tuple[int, int, str]] = {}  # version -> (state, error code, message)
        version, path = find_latest_version(self.base)  # ModelLoadError: one line at start-up
        self._load(version, path)  # ModelLoadError at start-up, as for a missing base path
        self._stop = threading.Event()
        self._thread = None
        if self.poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="tfserving-test-double-poll", daemon=True)
            self._thread.start()

    @property
    def current(self) -> _Servable | None:
        return self._current

    def _load(self, version: int, path: Path) -> None:
        self.states[version] = (_State.LOADING, 0, "")
        try:
            servable = _Servable(self.name, version, path, **self._kwargs)
        except ModelLoadError as exc:
            self.states[version] = (_State.END, grpc.StatusCode.UNKNOWN.value[0], str(exc))
            raise
        with self._lock:
            old, self._current = self._current, servable
            self.states[version] = (_State.AVAILABLE, 0, "")
            if old is not None:
                self.states[old.version] = (_State.END, 0, "")
        if old is not None:
            log.info("TEST DOUBLE server unloaded %s version %d", self.name, old.version)

    def poll(self) -> None:
        """One look at the base path (see the class docstring); never raises."""
        try:
            versions = list_versions(self.base)
        except ModelLoadError as exc:
            log.warning("TEST DOUBLE server: %s", exc)
            versions = {}
        current = self._current
        if current is not None and current.version not in versions:
            with self._lock:
                self._current = None
                self.states[current.version] = (_State.END, 0, "")
            log.info("TEST DOUBLE server unloaded %s version %d (its folder is gone)", self.name, current.version)
            current = None
        good = [v for v in versions if self.states.get(v, (0, 0, ""))[1] == 0]  # failed ones are not retried
        if not good or (current is not None and current.version >= max(good)):
            return
        latest = max(good)
        try:
            self._load(latest, versions[latest])
        except ModelLoadError as exc:
            log.warning("TEST DOUBLE server: version %d of %s not loaded: %s", latest, self.name, exc)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def get(self, name: str, version: int | None, version_label: str = "") -> _Servable:
        """The servable for a request's model spec, or NOT_FOUND as TF Serving says it."""
        spec = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
        current = self._current
        if name != self.name or current is None:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {spec}")
        if version_label:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"version label {version_label!r} not found (this test double serves no labels)",
            )
        if version is not None and version != current.version:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: {spec} (loaded version: {current.version})",
            )
        return current

    def status(self, name: str, version: int | None) -> get_model_status_pb2.GetModelStatusResponse:
        """``GetModelStatus`` as TF Serving answers it (every version it has seen, or one)."""
        if name != self.name or not self.states:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        if version is not None and version not in self.states:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in sorted(self.states) if version is None else [version]:
            state, code, message = self.states[v]
            entry = response.model_version_status.add()
            entry.version = v
            entry.state = state
            entry.status.error_code = code
            entry.status.error_message = message
        return response


# ---------------------------------------------------------------------- gRPC --


def _declared_bytes(servable: _Servable, key: str, proto) -> int:
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
    return servable.check_size(key, shape, itemsize)


def _version_of(spec) -> int | None:
    return spec.version.value if spec.HasField("version") else None


def _abort(context, exc: Exception):
    if isinstance(exc, ServingError):
        context.abort(exc.code, exc.message)
    log.exception("TEST DOUBLE server: unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """gRPC PredictionService of the TEST DOUBLE server (not TF Serving): Predict and GetModelMetadata."""

    def __init__(self, model: _Model):
        self.model = model

    def Predict(self, request, context):
        try:
            spec = request.model_spec
            servable = self.model.get(spec.name, _version_of(spec), spec.version_label)
            name, sig_def, _ = servable.signature(spec.signature_name)
            servable.check_keys(name, sig_def, request.inputs)
            # every declared size, and their sum, before any tensor is built
            servable.check_total({k: _declared_bytes(servable, k, proto) for k, proto in request.inputs.items()})
            inputs = {}
            for key, proto in request.inputs.items():
                try:
                    inputs[key] = tf.make_ndarray(proto)
                except Exception as exc:  # malformed TensorProto (size/shape mismatch, bad dtype)
                    raise ServingError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': cannot parse TensorProto: {exc}"
                    ) from exc
                if proto.dtype == _STRING_DTYPE:
                    inputs[key] = inputs[key].astype(object)
            name, outputs = servable.predict(spec.signature_name, inputs, list(request.output_filter))
            response = predict_pb2.PredictResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = name
            for alias, arr in outputs.items():
                response.outputs[alias].CopyFrom(tf.make_tensor_proto(arr))
            return response
        except Exception as exc:
            _abort(context, exc)

    def GetModelMetadata(self, request, context):
        try:
            spec = request.model_spec
            servable = self.model.get(spec.name, _version_of(spec), spec.version_label)
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
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].Pack(_signature_def_map(servable))
            return response
        except Exception as exc:
            _abort(context, exc)


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """gRPC ModelService of the TEST DOUBLE server: GetModelStatus (HandleReloadConfigRequest: UNIMPLEMENTED)."""

    def __init__(self, model: _Model):
        self.model = model

    def GetModelStatus(self, request, context):
        try:
            if not request.HasField("model_spec"):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
            spec = request.model_spec
            return self.model.status(spec.name, _version_of(spec))
        except Exception as exc:
            _abort(context, exc)


def _signature_def_map(servable: _Servable) -> get_model_metadata_pb2.SignatureDefMap:
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in servable.signature_defs.items():
        sig_map.signature_def[key].CopyFrom(sig)
    return sig_map


# ---------------------------------------------------------------------- REST --

# TF Serving's own path expressions (model_servers/http_rest_api_util.cc), matched in full, any case.
_PREDICT_RE = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE
)
_MODEL_RE = re.compile(r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.I)
_V1_RE = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)  # what TF Serving's REST handler answers at all
_HTTP_STATUS = {  # TF Serving's ToHTTPStatusCode (model_servers/http_server.cc), but 408 for an incomplete body
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.DEADLINE_EXCEEDED: 408,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
}


def _bad(msg: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def _decode_strings(value, key: str, depth: int = 0):
    """JSON value -> nested lists of bytes ({"b64": ...} decoded, str UTF-8 encoded).

    Every element's nesting is bounded (``MAX_JSON_DEPTH``), not only the first one's: a string
    nested hundreds of lists deep in a later element is a 400, never a RecursionError.
    """
    if isinstance(value, list):
        if depth >= MAX_JSON_DEPTH:
            raise _bad(
                f"input '{key}': JSON lists nested more than {MAX_JSON_DEPTH} deep; a tensor has at most "
                f"{MAX_JSON_DEPTH} dimensions"
            )
        return [_decode_strings(v, key, depth + 1) for v in value]
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


def _check_json_values(body: bytes, max_request_bytes: int) -> None:
    """Refuse a REST body whose parsed JSON could cost more than ``max_request_bytes``, BEFORE parsing it.

    Every JSON value but the last of a list or object is followed by a comma, so commas plus
    twice the brackets bound the number of Python objects ``json.loads`` builds; each costs
    about :data:`JSON_VALUE_BYTES` (a float object and its list slot, then the float64 array
    and the tensor). Without this a 33 MB body of ``0.5,`` costs 440 MB.
    """
    values = body.count(b",") + 2 * (body.count(b"[") + body.count(b"{")) + 1
    limit = max(1, int(max_request_bytes) // JSON_VALUE_BYTES)
    if values > limit:
        raise _bad(
            f"request body holds up to {values} JSON values, over this server's limit of {limit} "
            f"(--max_request_bytes {max_request_bytes} / {JSON_VALUE_BYTES} bytes a parsed value); split the "
            "request or use gRPC"
        )


def _rest_predict(model: _Model, name: str, version: int | None, label: str | None, body: bytes):
    servable = model.get(name, version, label or "")
    _check_json_values(body, servable.max_request_bytes)
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
    """ThreadingHTTPServer with a listen backlog for many clients (not 5) and at most ``threads`` connections served.

    A connection beyond ``threads`` waits in the listen backlog until one ends (as with TF
    Serving's fixed pool of ``--rest_api_num_threads``); one that waited ``slot_wait``
    seconds gets 503 and is closed. Without the bound every connection got its own thread.
    """

    request_queue_size = REST_LISTEN_BACKLOG
    daemon_threads = True
    allow_reuse_address = True  # SO_REUSEADDR: restart after TIME_WAIT; a port in use still fails (no REUSEPORT)

    def __init__(self, address, handler, threads: int = DEFAULT_REST_THREADS, slot_wait: float = 30.0):
        if int(threads) < 1:
            raise ValueError(f"REST threads must be >= 1, got {threads}")
        self.threads = int(threads)
        self.slot_wait = float(slot_wait)
        self._slots = threading.BoundedSemaphore(self.threads)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(timeout=self.slot_wait):
            body = json.dumps({"error": f"all {self.threads} REST connections busy (--rest_api_num_threads)"})
            try:
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            thread = threading.Thread(
                target=self.process_request_thread,
                args=(request, client_address),
                name="tfserving-test-double-rest-conn",
                daemon=True,
            )
            thread.start()
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


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
    """``GET /v1/models/<name>/metadata``: TF Serving's JSON (proto field names, default values printed)."""
    sig_map = json_format.MessageToDict(
        _signature_def_map(servable), preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return {
        "model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
        "metadata": {"signature_def": sig_map},
    }


def _status_payload(model: _Model, name: str, version: int | None) -> dict:
    """``GET /v1/models/<name>[/versions/N]``: the GetModelStatusResponse, as TF Serving prints it."""
    return json_format.MessageToDict(model.status(name, version), always_print_fields_with_no_presence=True)


def _parse_path(method: str, raw_path: str):
    """``(model name, version, label, verb or subresource)`` of a REST path, as TF Serving parses it.

    Paths under ``/v1/`` that do not parse are INVALID_ARGUMENT ("Malformed request"), as in TF
    Serving; other paths are NOT_FOUND.
    """
    path = raw_path.split("?", 1)[0]
    if not _V1_RE.fullmatch(path):
        raise ServingError(grpc.StatusCode.NOT_FOUND, f"unsupported path {path}; TF Serving answers under /v1/")
    m = (_PREDICT_RE if method == "POST" else _MODEL_RE).fullmatch(path)
    if not m:
        raise _bad(f"Malformed request: {method} {path}")
    name = urllib.parse.unquote(m.group(1)) if m.group(1) else ""
    if not name:
        raise _bad("Missing model name in request.")
    version = int(m.group(2)) if m.group(2) else None
    label = urllib.parse.unquote(m.group(3)) if m.group(3) else None
    return name, version, label, (m.group(4) or "").lower()


def _make_rest_handler(model: _Model, request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
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

        def do_POST(self):
            try:
                body = _read_request_body(self, model.max_request_bytes, request_timeout)
                name, version, label, verb = _parse_path("POST", self.path)
                if verb != "predict":
                    model.get(name, version, label or "")
                    raise ServingError(
                        grpc.StatusCode.UNIMPLEMENTED, f":{verb} is not served by this test double (only :predict)"
                    )
                self._send(200, _rest_predict(model, name, version, label, body))
            except Exception as exc:
                self._error(exc)

        def do_GET(self):
            try:
                name, version, label, sub = _parse_path("GET", self.path)
                if sub == "metadata":
                    self._send(200, _metadata_payload(model.get(name, version, label or "")))
                else:
                    if label:
                        model.get(name, version, label)  # NOT_FOUND: no labels here
                    self._send(200, _status_payload(model, name, version))
            except Exception as exc:
                self._error(exc)

    return _RestHandler


# -------------------------------------------------------------------- handle --


class LocalServingHandle:
    """A running TEST DOUBLE server (not TF Serving): ``grpc_address`` and ``rest_url`` (None when off), ``stop()``.

    ``version`` is the version served now (None while none is); ``servable`` its loaded model.
    """

    def __init__(
        self, model: _Model, grpc_server=None, grpc_port: int | None = None, http_server=None, http_thread=None
    ):
        self.model = model
        self.model_name = model.name
        self._grpc_server = grpc_server
        self._http_server = http_server
        self._http_thread = http_thread
        self.grpc_address = f"127.0.0.1:{grpc_port}" if grpc_server is not None else None
        self.rest_url = f"http://127.0.0.1:{http_server.server_address[1]}" if http_server else None

    @property
    def servable(self):
        return self.model.current

    @property
    def version(self) -> int | None:
        current = self.model.current
        return None if current is None else current.version

    def stop(self, grace: float | None = 1.0) -> None:
        self.model.stop()
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
    grpc_port: int | None = 0,
    rest_port: int | None = None,
    *,
    max_workers: int = DEFAULT_GRPC_THREADS,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_request_bytes: int = MAX_MESSAGE_BYTES,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    rest_threads: int = DEFAULT_REST_THREADS,
) -> LocalServingHandle:
    """Start the TEST DOUBLE of TF Serving on 127.0.0.1 and return its handle.

    Args:
        model_base_path: TF Serving layout ``<base>/<version>/saved_model.pb``; the highest
            version is served, and the folder is polled for new and removed versions.
        model_name: the name clients put in ``model_spec.name`` / the REST URL.
        grpc_port: None disables gRPC; 0 picks a free port (the command's ``--port 0`` disables it,
            as TF Serving's).
        rest_port: None disables REST; 0 picks a free port (the command's ``--rest_api_port 0``
            disables it, as TF Serving's).
        max_workers: gRPC handler threads; at most ``4 * max_workers`` calls are queued.
        max_batch: the largest first dimension of any input (larger: INVALID_ARGUMENT / 400).
        max_request_bytes: the largest request (gRPC message, REST body), the most bytes the
            tensors of one request may declare together, and (divided by 48) the most JSON
            values of a REST body.
        request_timeout: seconds a REST client may take to send its request line, headers
            and body (an incomplete body: HTTP 408).
        poll_seconds: seconds between two looks at ``model_base_path`` (0: only at start).
        rest_threads: REST connections served at once.

    Raises:
        ModelLoadError: the base path is missing, holds no version, or its latest version does
            not load (one line naming the folder).
        OSError: a port is in use (or cannot be bound).
    """
    if grpc_port is None and rest_port is None:
        raise ValueError("both gRPC and REST are disabled: give grpc_port or rest_port")
    model = _Model(
        model_name,
        model_base_path,
        poll_seconds=poll_seconds,
        max_batch=max_batch,
        max_request_bytes=max_request_bytes,
    )
    server = http_server = http_thread = None
    port = None
    try:
        if grpc_port is not None:
            options = [
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", int(max_request_bytes)),
                ("grpc.so_reuseport", 0),  # gRPC's default 1 lets a second server share a busy port
            ]
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tfserving-test-double-grpc"),
                options=options,
                maximum_concurrent_rpcs=4 * int(max_workers),
            )
            prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_PredictionService(model), server)
            model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(model), server)
            try:
                port = server.add_insecure_port(f"127.0.0.1:{grpc_port}")
            except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind ...")
                port = 0
                why = str(exc)
            else:
                why = ""
            if not port:
                server = None
                raise OSError(
                    f"cannot listen for gRPC on 127.0.0.1:{grpc_port}: the port is in use or not available "
                    f"({why or 'bind failed'}); choose another --port"
                )
            server.start()
        if rest_port is not None:
            try:
                http_server = _RestServer(
                    ("127.0.0.1", rest_port),
                    _make_rest_handler(model, request_timeout),
                    threads=rest_threads,
                    slot_wait=request_timeout,
                )
            except OSError as exc:
                raise OSError(
                    f"cannot listen for REST on 127.0.0.1:{rest_port}: {exc.strerror or exc}; choose another "
                    "--rest_api_port"
                ) from exc
            http_thread = threading.Thread(
                target=http_server.serve_forever, name="tfserving-test-double-rest", daemon=True
            )
            http_thread.start()
    except BaseException:
        model.stop()
        if server is not None:
            server.stop(None)
        raise
    return LocalServingHandle(model, server, port, http_server, http_thread)
