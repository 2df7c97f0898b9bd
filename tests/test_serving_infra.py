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
    status, payload = post(b'{"inputs": {"features": ' + b"[" * 100000 + b"]" * 100000 + b"}}")
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
