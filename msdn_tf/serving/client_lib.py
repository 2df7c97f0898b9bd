"""Client helpers for TensorFlow Serving (gRPC PredictionService and REST JSON).

Works against a real TF Serving (``tensorflow_model_server``) as well as the
local test double in :mod:`msdn_tf.serving.local_server`.

* :func:`make_predict_request` -- a ``PredictRequest`` from numpy arrays and/or
  lists of encoded image bytes;
* :class:`GrpcClient` / :func:`predict_grpc` -- send it over gRPC (raised
  ``max_send_message_length`` / ``max_receive_message_length``), return numpy;
* :func:`predict_rest` -- the same over TF Serving's REST API (urllib; bytes as
  ``{"b64": ...}``);
* :func:`get_signature_defs_grpc` -- ``GetModelMetadata`` (signature_def).

Every transport or server error is raised as :class:`PredictError` with the
gRPC status-code name (``"INVALID_ARGUMENT"``, ``"NOT_FOUND"``, ...) and the
server's message.

String (``DT_STRING``) outputs come back as numpy object arrays of ``bytes``.
REST returns JSON numbers, so REST numeric outputs are float64/int64 arrays
(cast them if you need the model's dtype); gRPC outputs keep the model dtype.

Importing this module imports neither TensorFlow nor gRPC: the REST path needs only the
standard library and NumPy (``python -m msdn_tf.client --rest`` starts in well under a
second). The gRPC functions import ``grpc`` and the ``tensorflow_serving.apis`` protos
(which import TensorFlow) when first called.
"""

from __future__ import annotations

import base64
import http.client
import json
import urllib.error
import urllib.request
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TIMEOUT",
    "GrpcClient",
    "PredictError",
    "get_signature_defs_grpc",
    "make_predict_request",
    "predict_grpc",
    "predict_rest",
]

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0
DEFAULT_SIGNATURE = "serving_default"

_HTTP_TO_CODE = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 501: "UNIMPLEMENTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


class PredictError(RuntimeError):
    """A failed serving call.

    Attributes:
        code: gRPC status-code name, e.g. ``"INVALID_ARGUMENT"``, ``"NOT_FOUND"``,
            ``"UNAVAILABLE"``, ``"DEADLINE_EXCEEDED"`` (for REST, derived from the HTTP status).
        message: the server's error message.
        transport: ``"grpc"`` or ``"rest"``.
        http_status: the HTTP status for REST errors, else None.
    """

    def __init__(self, code: str, message: str, transport: str, http_status: int | None = None):
        super().__init__(f"{transport} {code}: {message}")
        self.code = code
        self.message = message
        self.transport = transport
        self.http_status = http_status


ImageBytes = Sequence[bytes]


def _is_bytes_list(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, (bytes, bytearray)) for v in value)


def _to_array(name: str, value) -> np.ndarray:
    if _is_bytes_list(value):
        arr = np.empty(len(value), dtype=object)
        arr[:] = [bytes(v) for v in value]
        return arr
    arr = np.asarray(value)
    if arr.dtype.kind == "U":
        raise TypeError(f"input {name!r}: pass encoded bytes, not str")
    return arr


def make_predict_request(
    model_name: str,
    inputs: Mapping[str, np.ndarray | ImageBytes],
    *,
    signature_name: str = DEFAULT_SIGNATURE,
    version: int | None = None,
    output_filter: Iterable[str] = (),
):
    """Build a ``PredictRequest``.

    Args:
        inputs: signature input key -> numpy array (sent with its own dtype; TF Serving
            does not cast, so match the signature's dtype) or a list of ``bytes``
            (e.g. encoded JPEG/PNG images) sent as a 1-D DT_STRING tensor.
        version: a specific model version; None means the latest.
        output_filter: only return these output aliases.

    Returns:
        a ``tensorflow_serving.apis.predict_pb2.PredictRequest``.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, value in inputs.items():
        arr = _to_array(name, value)
        request.inputs[name].CopyFrom(tf.make_tensor_proto(arr))
    request.output_filter.extend(output_filter)
    return request


def _grpc_error(exc) -> PredictError:
    import grpc

    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and "HTTP/2" in (details or ""):
        details += (
            "; the server does not speak gRPC: is it the REST port? TF Serving's gRPC port is 8500 by "
            "default, REST 8501 (use --rest http://HOST:PORT for REST)"
        )
    return PredictError(code.name if code is not None else "UNKNOWN", details or "", "grpc")


class GrpcClient:
    """A gRPC PredictionService client keeping one channel open.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.address = address
        self.timeout = timeout
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channel = grpc.insecure_channel(address, options=options)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def predict_request(self, request):
        """Send a ``PredictRequest``; return the ``PredictResponse``."""
        import grpc

        try:
            return self._stub.Predict(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from exc

    def predict(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray | ImageBytes],
        *,
        signature_name: str = DEFAULT_SIGNATURE,
        version: int | None = None,
        output_filter: Iterable[str] = (),
    ) -> dict[str, np.ndarray]:
        """Predict and return output alias -> numpy array."""
        request = make_predict_request(
            model_name, inputs, signature_name=signature_name, version=version, output_filter=output_filter
        )
        response = self.predict_request(request)
        import tensorflow as tf

        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    def get_signature_defs(self, model_name: str, *, version: int | None = None) -> dict:
        """``GetModelMetadata`` -> signature key -> ``SignatureDef`` proto."""
        import grpc
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = model_name
        if version is not None:
            request.model_spec.version.value = int(version)
        request.metadata_field.append("signature_def")
        try:
            response = self._stub.GetModelMetadata(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from exc
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(sig_map):
            raise PredictError("INTERNAL", "metadata 'signature_def' is not a SignatureDefMap", "grpc")
        return dict(sig_map.signature_def)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def predict_grpc(
    address: str,
    model_name: str,
    inputs: Mapping[str, np.ndarray | ImageBytes],
    *,
    signature_name: str = DEFAULT_SIGNATURE,
    version: int | None = None,
    output_filter: Iterable[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> dict[str, np.ndarray]:
    """One-shot gRPC Predict (opens and closes a channel)."""
    with GrpcClient(address, timeout=timeout, max_message_bytes=max_message_bytes) as client:
        return client.predict(
            model_name, inputs, signature_name=signature_name, version=version, output_filter=output_filter
        )


def get_signature_defs_grpc(
    address: str, model_name: str, *, version: int | None = None, timeout: float = DEFAULT_TIMEOUT
) -> dict:
    """One-shot gRPC GetModelMetadata -> signature key -> SignatureDef proto."""
    with GrpcClient(address, timeout=timeout) as client:
        return client.get_signature_defs(model_name, version=version)


# ---------------------------------------------------------------------- REST --


def _to_json_value(arr: np.ndarray):
    if arr.dtype == object or arr.dtype.kind == "S":

        def conv(x):
            if isinstance(x, list):
                return [conv(v) for v in x]
            return {"b64": base64.b64encode(bytes(x)).decode("ascii")}

        return conv(arr.tolist())
    return arr.tolist()


def _from_json_value(value) -> np.ndarray:
    def has_strings(x):
        if isinstance(x, list):
            return any(has_strings(v) for v in x[:1])
        return isinstance(x, (str, dict))

    if has_strings(value):

        def conv(x):
            if isinstance(x, list):
                return [conv(v) for v in x]
            if isinstance(x, dict):
                return base64.b64decode(x["b64"])
            return x.encode("utf-8")

        return np.array(conv(value), dtype=object)
    return np.asarray(value)


def _rest_call(url: str, body: bytes | None, timeout: float) -> dict:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    raw = None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw)
    except ValueError as exc:
        if raw is None:
            raise PredictError(
                "INVALID_ARGUMENT", f"{url} is not a usable REST URL ({exc}); give e.g. http://localhost:8501", "rest"
            ) from exc
        raise PredictError(
            "UNKNOWN",
            f"{url} did not answer with JSON ({raw[:60]!r}...); is it TF Serving's REST port (8501 by default)?",
            "rest",
        ) from exc
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            payload = json.loads(raw)
            message = payload["error"] if isinstance(payload, dict) and "error" in payload else raw.decode()
        except ValueError:
            message = raw.decode("utf-8", "replace")
        raise PredictError(_HTTP_TO_CODE.get(exc.code, f"HTTP_{exc.code}"), message, "rest", exc.code) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise PredictError("DEADLINE_EXCEEDED", f"no answer from {url} within {timeout} s", "rest") from exc
        raise PredictError("UNAVAILABLE", f"cannot reach {url}: {exc.reason}", "rest") from exc
    except TimeoutError as exc:
        raise PredictError("DEADLINE_EXCEEDED", f"no answer from {url} within {timeout} s", "rest") from exc
    except (http.client.HTTPException, ConnectionError) as exc:  # e.g. a gRPC (HTTP/2) port
        raise PredictError(
            "UNAVAILABLE",
            f"{url} did not answer as an HTTP/1.1 REST server "
            f"({type(exc).__name__}); is it the gRPC port? TF Serving's REST port is 8501 by "
            "default, gRPC 8500",
            "rest",
        ) from exc


def _model_url(base_url: str, model_name: str, version: int | None) -> str:
    url = f"{base_url.rstrip('/')}/v1/models/{model_name}"
    if version is not None:
        url += f"/versions/{int(version)}"
    return url


def predict_rest(
    base_url: str,
    model_name: str,
    inputs: Mapping[str, np.ndarray | ImageBytes],
    *,
    signature_name: str = DEFAULT_SIGNATURE,
    version: int | None = None,
    row_format: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, np.ndarray]:
    """Predict over TF Serving's REST API (``base_url`` like ``http://host:8501``).

    Sends the columnar ``{"inputs": {...}}`` form by default, or the row form
    ``{"instances": [...]}`` with ``row_format=True`` (all inputs must then share
    the batch size).  Returns output alias -> numpy array.  When the signature has a
    single output, TF Serving's answer does not name it, so its alias is looked up
    with the ``/metadata`` endpoint.
    """
    arrays = {name: _to_array(name, value) for name, value in inputs.items()}
    payload: dict = {"signature_name": signature_name}
    if row_format:
        sizes = {len(a) for a in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"row format needs one batch size for all inputs, got {sorted(sizes)}")
        cols = {k: _to_json_value(a) for k, a in arrays.items()}
        n = sizes.pop()
        if len(cols) == 1:
            payload["instances"] = next(iter(cols.values()))
        else:
            payload["instances"] = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    else:
        payload["inputs"] = {k: _to_json_value(a) for k, a in arrays.items()}
    url = _model_url(base_url, model_name, version)
    answer = _rest_call(url + ":predict", json.dumps(payload).encode("utf-8"), timeout)
    try:
        return _rest_outputs(answer, url, signature_name, row_format, timeout)
    except PredictError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise PredictError(
            "UNKNOWN",
            f"{url} answered JSON that is not a TF Serving predict response ({type(exc).__name__}: {exc})",
            "rest",
        ) from exc


def _rest_outputs(answer, url: str, signature_name: str, row_format: bool, timeout: float) -> dict:
    """The outputs of a REST predict answer (row or columnar form), by alias."""
    if not isinstance(answer, dict):
        raise TypeError(f"expected a JSON object, got {type(answer).__name__}")
    if "error" in answer:
        raise PredictError("UNKNOWN", str(answer["error"]), "rest")

    def single_alias() -> str:
        meta = _rest_call(url + "/metadata", None, timeout)
        outputs = meta["metadata"]["signature_def"]["signature_def"][signature_name]["outputs"]
        (alias,) = outputs.keys()
        return alias

    if row_format:
        preds = answer["predictions"]
        if preds and isinstance(preds[0], dict) and "b64" not in preds[0]:
            return {k: _from_json_value([p[k] for p in preds]) for k in preds[0]}
        return {single_alias(): _from_json_value(preds)}
    outputs = answer["outputs"]
    if isinstance(outputs, dict) and "b64" not in outputs:
        return {k: _from_json_value(v) for k, v in outputs.items()}
    return {single_alias(): _from_json_value(outputs)}
