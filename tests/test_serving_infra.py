"""Model-independent serving infrastructure: C++ loader check, TF Serving test double, clients.

A toy Keras 3 model is exported once (module fixture) with keras.export.ExportArchive
to <tmp>/model/1 with two endpoints:
  serving_default  features float32 (None, 4, 3)      -> {"embedding", "logits"}
  serving_images   images   string   (None,) PNG/JPEG -> decode, resize, reduce -> same model
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from msdn_tf.cli import cc_loader as cc_loader_cli  # noqa: E402
from msdn_tf.serving import cc_loader, client_lib  # noqa: E402
from msdn_tf.serving.local_server import start_local_server  # noqa: E402

MODEL_NAME = "toy"
OUTPUTS = ("embedding", "logits")


def _preprocess_one(encoded):
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, (4, 4))
    return tf.reduce_mean(image, axis=1)  # (4, 3)


def _preprocess(batch):
    return tf.map_fn(_preprocess_one, batch, fn_output_signature=tf.TensorSpec((4, 3), tf.float32))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(0)
    features = keras.Input((4, 3), name="features")
    hidden = keras.layers.Dense(8, activation="relu")(features)
    hidden = keras.layers.Flatten()(hidden)
    model = keras.Model(
        features,
        {
            "logits": keras.layers.Dense(3, name="logits")(hidden),
            "embedding": keras.layers.Dense(2, name="embedding")(hidden),
        },
    )

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec((None, 4, 3), tf.float32, name="features")],
    )
    archive.add_endpoint(
        "serving_images",
        lambda images: model(_preprocess(images), training=False),
        input_signature=[tf.TensorSpec((None,), tf.string, name="images")],
    )
    base = tmp_path_factory.mktemp("serving") / "model"
    archive.write_out(str(base / "1"), verbose=False)

    rng = np.random.default_rng(0)
    x = rng.random((3, 4, 3), dtype=np.float32)
    images = [
        tf.io.encode_png(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).numpy(),
        tf.io.encode_png(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).numpy(),
        tf.io.encode_jpeg(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).numpy(),
    ]
    ref = {k: np.asarray(v) for k, v in model(x, training=False).items()}
    ref_images = {k: np.asarray(v) for k, v in model(_preprocess(tf.constant(images)), training=False).items()}
    return {"base": base, "dir": base / "1", "x": x, "images": images, "ref": ref, "ref_images": ref_images}


@pytest.fixture(scope="module")
def cc_binary():
    try:
        return cc_loader.compile_loader()
    except cc_loader.CcLoaderUnavailable as exc:
        pytest.skip(f"C++ SavedModel loader cannot be built here: {exc}")


@pytest.fixture(scope="module")
def server(exported):
    handle = start_local_server(exported["base"], MODEL_NAME, grpc_port=0, rest_port=0)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_address)
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


def _assert_outputs(got, want, atol=1e-5):
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key], np.float64), want[key], atol=atol, err_msg=key)


# ------------------------------------------------------------ (a) C++ loader --


def test_cc_loader_lists_signatures(exported, cc_binary):
    info = cc_loader.inspect_saved_model(exported["dir"], binary=cc_binary)
    sigs = info["signatures"]
    assert sorted(sigs) == ["serving_default", "serving_images"]
    assert sigs["serving_default"]["inputs"]["features"]["dtype"] == "DT_FLOAT"
    assert sigs["serving_default"]["inputs"]["features"]["shape"] == [-1, 4, 3]
    assert sigs["serving_images"]["inputs"]["images"]["dtype"] == "DT_STRING"
    assert sigs["serving_images"]["inputs"]["images"]["shape"] == [-1]
    for sig in sigs.values():
        assert sorted(sig["outputs"]) == sorted(OUTPUTS)
        assert sig["method_name"] == "tensorflow/serving/predict"


def test_cc_loader_runs_serving_default(exported, cc_binary):
    out = cc_loader.run_signature(exported["dir"], "serving_default", {"features": exported["x"]}, binary=cc_binary)
    assert all(v.dtype == np.float32 for v in out.values())
    _assert_outputs(out, exported["ref"])


def test_cc_loader_runs_string_inputs(exported, cc_binary):
    out = cc_loader.run_signature(exported["dir"], "serving_images", {"images": exported["images"]}, binary=cc_binary)
    _assert_outputs(out, exported["ref_images"])


def test_cc_loader_reports_errors(exported, cc_binary):
    with pytest.raises(cc_loader.CcLoaderError, match="Unknown image file format"):
        cc_loader.run_signature(exported["dir"], "serving_images", {"images": [b"not an image"]}, binary=cc_binary)
    with pytest.raises(cc_loader.CcLoaderError, match="wants DT_FLOAT"):
        cc_loader.run_signature(
            exported["dir"], "serving_default", {"features": exported["x"].astype(np.float64)}, binary=cc_binary
        )
    with pytest.raises(cc_loader.CcLoaderError, match="unknown signature"):
        cc_loader.run_signature(exported["dir"], "nope", {"features": exported["x"]}, binary=cc_binary)
    with pytest.raises(cc_loader.CcLoaderError, match="not a SavedModel"):
        cc_loader.inspect_saved_model(exported["base"], binary=cc_binary)


def test_cc_loader_catches_tf_saved_model_save_of_keras3(tmp_path, cc_binary):
    """Why the C++ check exists: this export loads (even in C++) but fails when run, as in TF Serving."""
    inp = keras.Input((4, 3))
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(inp)))
    tf.saved_model.save(model, str(tmp_path / "1"))
    info = cc_loader.inspect_saved_model(tmp_path / "1", binary=cc_binary)
    (key,) = info["signatures"]["serving_default"]["inputs"]
    with pytest.raises(cc_loader.CcLoaderError, match="Could not find variable"):
        cc_loader.run_signature(
            tmp_path / "1", "serving_default", {key: np.ones((1, 4, 3), np.float32)}, binary=cc_binary
        )


def test_cc_loader_cli(exported, cc_binary, tmp_path, capsys):
    np.save(tmp_path / "x.npy", exported["x"])
    rc = cc_loader_cli.main(
        [
            str(exported["dir"]),
            "--signature",
            "serving_default",
            "--input",
            f"features={tmp_path / 'x.npy'}",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["logits"]["shape"] == [3, 3]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "logits.npy"), exported["ref"]["logits"], atol=1e-5)


def test_saved_model_cli_show(exported):
    cli = Path(sys.executable).with_name("saved_model_cli")
    if not cli.exists():
        pytest.skip(f"saved_model_cli not found next to {sys.executable}")
    proc = subprocess.run(
        [str(cli), "show", "--dir", str(exported["dir"]), "--all"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "signature_def['serving_default']" in proc.stdout
    assert "signature_def['serving_images']" in proc.stdout


# ------------------------------------------------------- (b) gRPC test double --


def test_grpc_predict_serving_default(exported, server):
    out = client_lib.predict_grpc(server.grpc_address, MODEL_NAME, {"features": exported["x"]})
    assert all(v.dtype == np.float32 for v in out.values())
    _assert_outputs(out, exported["ref"])


def test_grpc_predict_images(exported, server):
    out = client_lib.predict_grpc(
        server.grpc_address, MODEL_NAME, {"images": exported["images"]}, signature_name="serving_images", version=1
    )
    _assert_outputs(out, exported["ref_images"])


def test_grpc_output_filter_and_response_spec(exported, stub):
    request = client_lib.make_predict_request(MODEL_NAME, {"features": exported["x"]}, output_filter=["logits"])
    response = stub.Predict(request, timeout=30)
    assert list(response.outputs) == ["logits"]
    assert response.model_spec.name == MODEL_NAME
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"


def test_grpc_model_metadata(server):
    sigs = client_lib.get_signature_defs_grpc(server.grpc_address, MODEL_NAME)
    assert {"serving_default", "serving_images"} <= set(sigs)
    assert sigs["serving_images"].inputs["images"].dtype == tf.string.as_datatype_enum
    assert sorted(sigs["serving_default"].outputs) == sorted(OUTPUTS)


# ------------------------------------------------------------------- (c) REST --


def test_rest_equals_grpc(exported, server):
    grpc_out = client_lib.predict_grpc(server.grpc_address, MODEL_NAME, {"features": exported["x"]})
    columnar = client_lib.predict_rest(server.rest_url, MODEL_NAME, {"features": exported["x"]})
    rows = client_lib.predict_rest(server.rest_url, MODEL_NAME, {"features": exported["x"]}, version=1, row_format=True)
    _assert_outputs(columnar, grpc_out, atol=0)
    _assert_outputs(rows, grpc_out, atol=0)


def test_rest_images_equals_grpc(exported, server):
    kwargs = {"signature_name": "serving_images"}
    grpc_out = client_lib.predict_grpc(server.grpc_address, MODEL_NAME, {"images": exported["images"]}, **kwargs)
    rest_out = client_lib.predict_rest(
        server.rest_url, MODEL_NAME, {"images": exported["images"]}, row_format=True, **kwargs
    )
    _assert_outputs(rest_out, grpc_out, atol=0)
    _assert_outputs(rest_out, exported["ref_images"])


def test_rest_raw_format(exported, server):
    """The wire format itself, as TF Serving documents it."""
    import urllib.request

    body = {
        "signature_name": "serving_images",
        "instances": [{"b64": base64.b64encode(exported["images"][0]).decode()}],
    }
    req = urllib.request.Request(
        f"{server.rest_url}/v1/models/{MODEL_NAME}:predict", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read())
    assert sorted(answer["predictions"][0]) == sorted(OUTPUTS)
    np.testing.assert_allclose(answer["predictions"][0]["logits"], exported["ref_images"]["logits"][0], atol=1e-5)
    with urllib.request.urlopen(f"{server.rest_url}/v1/models/{MODEL_NAME}", timeout=30) as resp:
        assert json.loads(resp.read())["model_version_status"][0]["state"] == "AVAILABLE"


# ----------------------------------------------------------- (d) bad requests --


def _raw_request(inputs: dict, signature="serving_default", model=MODEL_NAME, version=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("wrong_shape", grpc.StatusCode.INVALID_ARGUMENT, "expects shape"),
        ("wrong_rank", grpc.StatusCode.INVALID_ARGUMENT, "expects shape"),
        ("wrong_dtype", grpc.StatusCode.INVALID_ARGUMENT, "expects DT_FLOAT"),
        ("string_for_float", grpc.StatusCode.INVALID_ARGUMENT, "expects DT_FLOAT"),
        ("unknown_input", grpc.StatusCode.INVALID_ARGUMENT, "unknown: ['pixels']"),
        ("missing_input", grpc.StatusCode.INVALID_ARGUMENT, "missing: ['features']"),
        ("malformed_image", grpc.StatusCode.INVALID_ARGUMENT, "Unknown image file format"),
        ("unknown_output_filter", grpc.StatusCode.INVALID_ARGUMENT, "output tensor alias not found"),
        # TF Serving answers FAILED_PRECONDITION 'Serving signature key "..." not found.'
        ("unknown_signature", grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "nope" not found'),
        ("unknown_model", grpc.StatusCode.NOT_FOUND, "Servable not found"),
        ("unknown_version", grpc.StatusCode.NOT_FOUND, "Servable not found"),
    ],
)
def test_grpc_bad_requests(exported, stub, case, code, message):
    x = exported["x"]
    requests = {
        "wrong_shape": lambda: _raw_request({"features": np.zeros((2, 5, 3), np.float32)}),
        "wrong_rank": lambda: _raw_request({"features": np.zeros((4, 3), np.float32)}),
        "wrong_dtype": lambda: _raw_request({"features": x.astype(np.float64)}),
        "string_for_float": lambda: _raw_request({"features": np.array([b"a"], dtype=object)}),
        "unknown_input": lambda: _raw_request({"features": x, "pixels": x}),
        "missing_input": lambda: _raw_request({}),
        "malformed_image": lambda: _raw_request(
            {"images": np.array([exported["images"][0], b"\x89PNG garbage"], dtype=object)}, signature="serving_images"
        ),
        "unknown_output_filter": lambda: client_lib.make_predict_request(
            MODEL_NAME, {"features": x}, output_filter=["probs"]
        ),
        "unknown_signature": lambda: _raw_request({"features": x}, signature="nope"),
        "unknown_model": lambda: _raw_request({"features": x}, model="other"),
        "unknown_version": lambda: _raw_request({"features": x}, version=7),
    }
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(requests[case](), timeout=30)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    # The server keeps serving.
    response = stub.Predict(_raw_request({"features": x}), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["logits"]), exported["ref"]["logits"], atol=1e-5)


def test_client_error_type(exported, server):
    with pytest.raises(client_lib.PredictError) as info:
        client_lib.predict_grpc(server.grpc_address, "other", {"features": exported["x"]})
    assert info.value.code == "NOT_FOUND" and info.value.transport == "grpc"
    with pytest.raises(client_lib.PredictError) as info:
        client_lib.get_signature_defs_grpc(server.grpc_address, MODEL_NAME, version=3)
    assert info.value.code == "NOT_FOUND"


def test_rest_bad_requests(exported, server):
    import urllib.error
    import urllib.request

    def post(body, model=MODEL_NAME):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(f"{server.rest_url}/v1/models/{model}:predict", data=data, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=30)
        payload = json.loads(info.value.read())
        return info.value.code, payload["error"]

    good = exported["x"].tolist()
    assert post({"inputs": {"features": np.zeros((2, 5, 3)).tolist()}}) == (
        400,
        "input 'features': expects shape (None, 4, 3) but got (2, 5, 3)",
    )
    status, error = post({"inputs": {"features": [["a"] * 3] * 4}})
    assert status == 400 and "expects DT_FLOAT" in error
    status, error = post({"instances": [[[1.0] * 3] * 4, [[1.0] * 3] * 3]})
    assert status == 400 and "rectangular" in error
    status, error = post({"signature_name": "nope", "inputs": {"features": good}})
    assert status == 400 and "not found" in error
    status, error = post(
        {"signature_name": "serving_images", "instances": [{"b64": base64.b64encode(b"garbage").decode()}]}
    )
    assert status == 400 and "Unknown image file format" in error
    status, error = post(b"{not json")
    assert status == 400 and "not valid JSON" in error
    status, error = post({"inputs": {"features": good}}, model="other")
    assert status == 404 and "Servable not found" in error
    with pytest.raises(client_lib.PredictError) as info:
        client_lib.predict_rest(server.rest_url, MODEL_NAME, {"features": [b"\x00" * 48]})
    assert info.value.http_status == 400 and info.value.code == "INVALID_ARGUMENT"
    # Still serving.
    out = client_lib.predict_rest(server.rest_url, MODEL_NAME, {"features": exported["x"]})
    _assert_outputs(out, exported["ref"])


# ------------------------------------------------------ (e) limits (issue 14) --


@pytest.fixture(scope="module")
def strict_server(exported):
    handle = start_local_server(
        exported["base"],
        MODEL_NAME,
        grpc_port=0,
        rest_port=0,
        max_batch=8,
        max_request_bytes=1 << 20,
        request_timeout=0.5,
    )
    yield handle
    handle.stop()


def _declared_only(shape, dtype=tf.float32):
    """A PredictRequest whose tensor declares ``shape`` but carries no values (TF fills them in)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = "serving_default"
    proto = request.inputs["features"]
    proto.dtype = dtype.as_datatype_enum
    for d in shape:
        proto.tensor_shape.dim.add(size=d)
    return request


@pytest.mark.parametrize(
    "shape, message",
    [
        ((20000, 4, 3), "batch of 20000 exceeds this server's limit of 8"),  # the 69-byte request, batch cap
        ((8, 4, 3, 100000), "over this server's limit of 1048576 bytes"),  # under the batch cap, over the size cap
    ],
)
def test_grpc_declared_tensor_is_capped_before_allocation(strict_server, exported, shape, message):
    import resource

    request = _declared_only(shape)
    assert request.ByteSize() < 100
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    channel = grpc.insecure_channel(strict_server.grpc_address)
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
        # nothing of that size was allocated (the peak RSS of this process, server included, did not move by 100 MB)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100 * 1024
        response = stub.Predict(_raw_request({"features": exported["x"]}), timeout=30)  # still answering
        assert tf.make_ndarray(response.outputs["logits"]).shape == (3, 3)
    finally:
        channel.close()


def _post_raw(url: str, head: bytes, body: bytes, timeout=10.0) -> tuple[int, dict]:
    import socket

    host, port = url[len("http://") :].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            data.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0] if b"Content-Length: " in data else 0
        ):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def test_rest_limits(strict_server, exported):
    url = strict_server.rest_url
    path = f"/v1/models/{MODEL_NAME}:predict"

    def post(body: bytes, length=None):
        length = len(body) if length is None else length
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()
        return _post_raw(url, head, body)

    # a body shorter than its Content-Length: 408 after request_timeout, not a thread blocked forever
    status, payload = post(b'{"inputs": ', length=1000)
    assert status == 408 and "got 11 of 1000 bytes" in payload["error"]
    status, payload = post(b"", length=-5)
    assert status == 400 and "invalid Content-Length" in payload["error"]
    status, payload = post(b"x" * 10, length=(1 << 20) + 1)
    assert status == 400 and "request body too large" in payload["error"]
    # deeply nested JSON: 400, not a RecursionError (500)
    status, payload = post(b'{"inputs": {"features": ' + b"[" * 5000 + b"]" * 5000 + b"}}")
    assert status == 400 and "nested too deeply" in payload["error"]
    status, payload = post(b'{"inputs": {"features": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}}")
    assert status == 400 and "nested more than 32 deep" in payload["error"]
    status, payload = post(json.dumps({"inputs": {"features": np.zeros((9, 4, 3)).tolist()}}).encode())
    assert status == 400 and "batch of 9 exceeds this server's limit of 8" in payload["error"]
    status, payload = post(json.dumps({"inputs": {"features": exported["x"].tolist()}}).encode())
    assert status == 200
    np.testing.assert_allclose(payload["outputs"]["logits"], exported["ref"]["logits"], atol=1e-5)


def test_rest_listen_backlog_holds_8_concurrent_clients(exported):
    """8 clients connecting at once are all queued (http.server's backlog of 5 drops the 7th and 8th SYN)."""
    import socket

    from msdn_tf.serving import local_server

    server = local_server._RestServer(("127.0.0.1", 0), local_server._make_rest_handler(None))
    try:  # not serving: connections wait in the listen queue, as when every handler thread is busy
        socks = [socket.create_connection(server.server_address, timeout=2.0) for _ in range(8)]
        for sock in socks:
            sock.close()
    finally:
        server.server_close()


# ----------------------------------- (f) budgets across inputs, threads, ports (issue 21) --


@pytest.fixture(scope="module")
def multi_base(tmp_path_factory):
    """A SavedModel whose serving_default takes four float32 (None, None) inputs a, b, c, d."""

    class Four(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, None), tf.float32, name=k) for k in "abcd"])
        def serve(self, a, b, c, d):
            return {"total": tf.reduce_sum(a) + tf.reduce_sum(b) + tf.reduce_sum(c) + tf.reduce_sum(d)}

    module = Four()
    base = tmp_path_factory.mktemp("multi") / "model"
    tf.saved_model.save(module, str(base / "1"), signatures={"serving_default": module.serve})
    return base


def test_grpc_inputs_are_capped_together_before_allocation(multi_base):
    """Four declared-only inputs of 800 KB each pass the 1 MiB per-input cap; together they are refused."""
    import resource

    handle = start_local_server(multi_base, "four", grpc_port=0, max_request_bytes=1 << 20, poll_seconds=0)
    channel = grpc.insecure_channel(handle.grpc_address)
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "four"
        for key in "abcd":
            proto = request.inputs[key]
            proto.dtype = tf.float32.as_datatype_enum
            proto.tensor_shape.dim.add(size=1)
            proto.tensor_shape.dim.add(size=200_000)
        assert request.ByteSize() < 250
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "declare 3200000 bytes together" in info.value.details()
        # an input the signature does not have is refused before anything is built for it
        request.inputs["zzz"].CopyFrom(request.inputs["a"])
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request, timeout=30)
        assert "unknown: ['zzz']" in info.value.details()
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 2 * 1024  # KiB: nothing was allocated
        ok = client_lib.predict_grpc(handle.grpc_address, "four", {k: np.ones((1, 2), np.float32) for k in "abcd"})
        assert float(ok["total"]) == 8.0
    finally:
        channel.close()
        handle.stop()


def test_rest_json_values_are_counted_before_parsing(strict_server):
    """A body of many small numbers is refused by counting, before json.loads builds Python floats (1 MiB / 48)."""
    body = b'{"inputs": {"features": [' + b"0.5," * 40000 + b"0.5]}}"
    assert len(body) < (1 << 20)  # under the body limit
    head = f"POST /v1/models/{MODEL_NAME}:predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    status, payload = _post_raw(strict_server.rest_url, head.encode(), body)
    assert status == 400 and "JSON values, over this server's limit of 21845" in payload["error"]


def _rest_conn_threads() -> int:
    import threading

    return sum(t.name == "tfserving-test-double-rest-conn" for t in threading.enumerate())


def test_rest_connection_threads_are_bounded(exported):
    import socket
    import time

    handle = start_local_server(
        exported["base"], MODEL_NAME, grpc_port=None, rest_port=0, rest_threads=2, request_timeout=1.0, poll_seconds=0
    )
    try:
        host, port = handle.rest_url[len("http://") :].split(":")
        socks = [socket.create_connection((host, int(port)), timeout=5) for _ in range(8)]  # idle clients
        time.sleep(0.3)
        assert _rest_conn_threads() <= 2  # was one thread per connection
        for sock in socks:
            sock.close()
        # once the idle ones time out, a real client is served
        out = client_lib.predict_rest(handle.rest_url, MODEL_NAME, {"features": exported["x"]}, timeout=30)
        _assert_outputs(out, exported["ref"])
    finally:
        handle.stop()


def test_busy_port_is_an_error(exported, server):
    grpc_port = int(server.grpc_address.rsplit(":", 1)[1])
    rest_port = int(server.rest_url.rsplit(":", 1)[1])
    with pytest.raises(OSError, match=f"cannot listen for gRPC on 127.0.0.1:{grpc_port}"):
        start_local_server(exported["base"], MODEL_NAME, grpc_port=grpc_port, poll_seconds=0)
    with pytest.raises(OSError, match=f"cannot listen for REST on 127.0.0.1:{rest_port}"):
        start_local_server(exported["base"], MODEL_NAME, grpc_port=None, rest_port=rest_port, poll_seconds=0)
    # the first server still answers alone
    _assert_outputs(
        client_lib.predict_grpc(server.grpc_address, MODEL_NAME, {"features": exported["x"]}), exported["ref"]
    )


# ------------------------------------------ (g) as TF Serving answers (issue 23 §3) --


def _get(url: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _keys(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from _keys(v)


def test_rest_metadata_uses_proto_field_names(server):
    """TF Serving prints GetModelMetadataResponse with preserve_proto_field_names (http_rest_api_util.cc)."""
    status, meta = _get(f"{server.rest_url}/v1/models/{MODEL_NAME}/metadata")
    assert status == 200
    assert meta["model_spec"] == {"name": MODEL_NAME, "signature_name": "", "version": "1"}
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    features = sig["inputs"]["features"]
    assert features["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in features["tensor_shape"]["dim"]] == ["-1", "4", "3"]
    assert features["tensor_shape"]["unknown_rank"] is False  # default values printed, as TF Serving does
    camel = sorted({k for k in _keys(meta) if any(c.isupper() for c in k) and "_" not in k and k.isidentifier()})
    assert not [k for k in camel if k[0].islower()], camel  # no signatureDef, tensorShape, methodName ...


def test_rest_status_and_paths_as_tf_serving(server):
    status, body = _get(f"{server.rest_url}/v1/models/{MODEL_NAME}")
    assert status == 200 and body == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert _get(f"{server.rest_url}/v1/models") == (400, {"error": "Missing model name in request."})
    assert _get(f"{server.rest_url}/v1/models/") == (400, {"error": "Malformed request: GET /v1/models/"})
    assert _get(f"{server.rest_url}/v1/models/{MODEL_NAME}/extra")[0] == 400
    assert _get(f"{server.rest_url}/V1/Models/{MODEL_NAME}/versions/1")[0] == 200  # TF Serving's paths ignore case
    assert _get(f"{server.rest_url}/v1/models/{MODEL_NAME}/versions/7") == (
        404,
        {"error": f"Could not find version 7 of model {MODEL_NAME}"},
    )
    assert _get(f"{server.rest_url}/v1/models/nope")[0] == 404
    assert _get(f"{server.rest_url}/healthz")[0] == 404


def test_grpc_get_model_status_with_official_stub(server):
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    channel = grpc.insecure_channel(server.grpc_address)
    try:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = MODEL_NAME
        response = stub.GetModelStatus(request, timeout=30)
        (entry,) = response.model_version_status
        assert entry.version == 1 and entry.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert entry.status.error_code == 0
        request.model_spec.name = "nope"
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModelStatus(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "Could not find any versions of model nope"
    finally:
        channel.close()


def _wait_for(predicate, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_new_versions_are_polled_and_removed_ones_unloaded(exported, tmp_path):
    import shutil

    base = tmp_path / "model"
    shutil.copytree(exported["dir"], base / "1")
    handle = start_local_server(base, MODEL_NAME, grpc_port=0, rest_port=0, poll_seconds=0.2)
    try:
        assert handle.version == 1
        shutil.copytree(exported["dir"], base / ".incoming")
        (base / ".incoming").rename(base / "2")  # as msdn_tf.export publishes: rename into place
        assert _wait_for(lambda: handle.version == 2)
        status, body = _get(f"{handle.rest_url}/v1/models/{MODEL_NAME}")
        states = {e["version"]: e["state"] for e in body["model_version_status"]}
        assert states == {"1": "END", "2": "AVAILABLE"}
        out = client_lib.predict_grpc(handle.grpc_address, MODEL_NAME, {"features": exported["x"]}, version=2)
        _assert_outputs(out, exported["ref"])
        with pytest.raises(client_lib.PredictError) as info:
            client_lib.predict_grpc(handle.grpc_address, MODEL_NAME, {"features": exported["x"]}, version=1)
        assert info.value.code == "NOT_FOUND"
        # a version that does not load leaves the served one in place, its error in the status
        (base / "3").mkdir()
        (base / "3" / "saved_model.pb").write_bytes(b"not a protocol buffer")
        assert _wait_for(lambda: _get(f"{handle.rest_url}/v1/models/{MODEL_NAME}/versions/3")[0] == 200)
        entry = _get(f"{handle.rest_url}/v1/models/{MODEL_NAME}/versions/3")[1]["model_version_status"][0]
        assert entry["state"] == "END" and "not a SavedModel" in entry["status"]["error_message"]
        assert handle.version == 2
        shutil.rmtree(base / "3")
        shutil.rmtree(base / "2")  # removed: unloaded, the highest remaining version is served again
        assert _wait_for(lambda: handle.version == 1)
        _assert_outputs(
            client_lib.predict_grpc(handle.grpc_address, MODEL_NAME, {"features": exported["x"]}), exported["ref"]
        )
    finally:
        handle.stop()


def test_missing_or_corrupt_model_is_one_line(tmp_path, capsys):
    from msdn_tf.cli import serve_local

    (tmp_path / "bad" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "1" / "saved_model.pb").write_bytes(b"\x08\x01garbage")
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path): "no version directory with a saved_model.pb",
        str(tmp_path / "bad"): "not a SavedModel",
    }
    for base, message in cases.items():
        assert (
            serve_local.main(["--model_base_path", base, "--model_name", "m", "--port", "0", "--rest_api_port", "1"])
            == 2
        )
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_serve_local_flags_as_tf_serving(exported, monkeypatch, capsys):
    """REST is off unless --rest_api_port is given; 0 disables a port; a busy port is one line."""
    import socket
    import time

    from msdn_tf.cli import serve_local

    def interrupt(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupt)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    base = ["--model_base_path", str(exported["base"]), "--model_name", MODEL_NAME]
    assert serve_local.main(base + ["--port", str(free), "--file_system_poll_wait_seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert f"grpc=127.0.0.1:{free}" in out and "rest=None" in out
    assert serve_local.main(base + ["--port", "0", "--rest_api_port", "0"]) == 2
    assert "disable both gRPC and REST" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert serve_local.main(base + ["--port", "0", "--rest_api_port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"error: cannot listen for REST on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1
