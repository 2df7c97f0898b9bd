"""SavedModel export of MSDN (msdn_tf.export), its C++ loader check, and the clients.

One small random MSDN (C=12 with 4 unseen, K=8, F=32, D=16) and a tiny conv
backbone (32x32 images -> 4x4x32 maps) are exported once per module with a gamma
crafted so that calibrated stacking changes the GZSL answer of one sample.
"""

from __future__ import annotations

import json
import os

import grpc
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from msdn_tf.cli import bench_serving as bench  # noqa: E402
from msdn_tf.cli import client, export  # noqa: E402
from msdn_tf.errors import MSDNError  # noqa: E402
from msdn_tf.evaluation.metrics import czsl_predictions, gzsl_predictions  # noqa: E402
from msdn_tf.model import build_msdn  # noqa: E402
from msdn_tf.serving import (  # noqa: E402
    cc_loader,
    classify,  # noqa: E402
    verify,  # noqa: E402
)
from msdn_tf.serving import export as serving_export  # noqa: E402
from msdn_tf.serving.local_server import start_local_server  # noqa: E402

C, K, F, D = 12, 8, 32, 16
UNSEEN = [1, 4, 7, 10]
SEEN = [c for c in range(C) if c not in UNSEEN]
NAMES = [f"{'unseen' if c in UNSEEN else 'seen'}_bird_{c:02d}" for c in range(C)]
IMAGE_SIZE = 32
TOP_K = 3
MODEL_NAME = "msdn_tiny"


def _tiny_model(seed=0):
    rng = np.random.default_rng(seed)
    att = np.abs(rng.standard_normal((C, K))).astype(np.float32)
    att /= np.linalg.norm(att, axis=1, keepdims=True)
    # A small non-zero margin: the scores keep it, and both seen and unseen classes still win somewhere.
    model = build_msdn(
        att,
        rng.standard_normal((K, D)).astype(np.float32),
        SEEN,
        UNSEEN,
        feature_dim=F,
        fusion_weights=(0.7, 0.3),
        bias=0.1,
    )
    for w in model.trainable_weights:  # W_2, W_1_1, W_2_1 start at zero: make both sub-nets matter
        w.assign(keras.ops.convert_to_tensor(0.5 * rng.standard_normal(tuple(w.shape)), w.dtype))
    return model


def _tiny_backbone():
    keras.utils.set_random_seed(1)
    inp = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Rescaling(1.0 / 128.0)(inp)
    x = keras.layers.Conv2D(8, 3, strides=4, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(F, 1, strides=2, activation="relu")(x)
    return keras.Model(inp, x, name="tiny_backbone")  # (B, 4, 4, F)


def _scores(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)["logits"]))


def _crafted_gamma(scores):
    """A gamma that moves exactly one sample's GZSL answer from a seen to an unseen class (no near tie)."""
    gaps = scores[:, SEEN].max(1) - scores[:, UNSEEN].max(1)  # > 0: a seen class wins without calibration
    b = int(np.argmin(np.where(gaps > 0, gaps, np.inf)))
    assert gaps[b] > 0, "no sample predicts a seen class"
    others = np.sort(gaps[gaps > gaps[b]])
    upper = others[0] if others.size else gaps[b] + 1.0
    return float((gaps[b] + upper) / 2 if others.size else gaps[b] + 0.5), b


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = _tiny_model()
    backbone = _tiny_backbone()
    for seed in range(3, 50):  # sparse, varied maps until some samples predict seen and some unseen classes
        rng = np.random.default_rng(seed)
        maps = (rng.exponential(1.0, (6, 4, 4, F)) * (rng.random((6, 4, 4, F)) < 0.2)).astype(np.float32)
        regions = maps.reshape(6, 16, F)  # (B, R, F)
        winners = set(np.argmax(_scores(model, regions), axis=1).tolist())
        if winners & set(SEEN) and winners & set(UNSEEN):
            break
    gamma, flipped = _crafted_gamma(_scores(model, regions))
    base = tmp_path_factory.mktemp("export") / "msdn_tiny"
    path = serving_export.export_saved_model(
        model,
        base,
        version=1,
        class_names=NAMES,
        seen_classes=SEEN,
        unseen_classes=UNSEEN,
        gamma=gamma,
        top_k=TOP_K,
        config={"data": {"dataset": "tiny"}},
        backbone=backbone,
        image_size=IMAGE_SIZE,
        backbone_id="tiny conv",
    )
    images = verify.synthetic_images(3)
    pre = serving_export.preprocess_image_batch(tf.constant(images), IMAGE_SIZE)
    image_scores = _scores(model, backbone(pre, training=False))
    return {
        "model": model,
        "backbone": backbone,
        "base": base,
        "dir": path,
        "maps": maps,
        "regions": regions,
        "gamma": gamma,
        "flipped": flipped,
        "images": images,
        "image_scores": image_scores,
    }


@pytest.fixture(scope="module")
def cc_binary():
    try:
        return cc_loader.compile_loader()
    except cc_loader.CcLoaderUnavailable as exc:
        pytest.skip(f"C++ SavedModel loader cannot be built here: {exc}")


@pytest.fixture(scope="module")
def report(setup, cc_binary):
    return verify.verify_export(
        setup["dir"],
        setup["model"],
        setup["maps"],
        sample_images=setup["images"],
        backbone=setup["backbone"],
        binary=cc_binary,
    )


@pytest.fixture(scope="module")
def cc_default(setup, cc_binary):
    return cc_loader.run_signature(setup["dir"], "serving_default", {"features": setup["regions"]}, binary=cc_binary)


@pytest.fixture(scope="module")
def server(setup):
    handle = start_local_server(setup["base"], MODEL_NAME, grpc_port=0, rest_port=0)
    yield handle
    handle.stop()


# ------------------------------------------------------------------------------ export + C++ loader


def test_layout_and_metadata_asset(setup):
    base, path = setup["base"], setup["dir"]
    assert path == str(base / "1")
    assert (base / "1" / "saved_model.pb").is_file()
    assert not [p for p in base.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    asset = json.loads((base / "1" / "assets" / serving_export.METADATA_FILE).read_text())
    beside = serving_export.read_metadata(base)  # OUT/msdn_metadata.json
    assert beside == asset
    assert asset["class_names"] == NAMES
    assert asset["seen_classes"] == SEEN and asset["unseen_classes"] == UNSEEN
    assert asset["gamma"] == pytest.approx(setup["gamma"]) and asset["top_k"] == TOP_K
    assert asset["fusion_weights"] == [0.7, 0.3] and asset["bias"] == pytest.approx(0.1)  # the scores keep this margin
    assert asset["config"] == {"data": {"dataset": "tiny"}}
    assert asset["images"]["image_size"] == IMAGE_SIZE
    # every class marked with its status and side; no class file; the model has no attribute names here
    assert [c["status"] for c in asset["classes"]] == [
        "trained-unseen" if c in UNSEEN else "trained-seen" for c in range(C)
    ]
    assert asset["class_file"] is None and asset["attribute_names"] is None
    assert asset["class_normalisation"]["rule"] == "l2_rows" and asset["top_attributes"] == 5


def test_cc_loader_and_saved_model_cli_list_signatures(report):
    assert report["loader"] == "c++"
    sigs = report["signatures"]
    assert sorted(sigs) == [
        "metadata",
        "serving_default",
        "serving_images",
        "serving_maps",
        "serving_open",
        "serving_open_sided",
    ]
    features = sigs["serving_default"]["inputs"]["features"]
    assert (features["dtype"], features["shape"]) == ("DT_FLOAT", [-1, -1, F])
    assert sigs["serving_maps"]["inputs"]["feature_maps"]["shape"] == [-1, -1, -1, F]
    assert sigs["serving_images"]["inputs"]["images"]["dtype"] == "DT_STRING"
    assert sigs["serving_open_sided"]["inputs"]["class_is_seen"]["dtype"] == "DT_BOOL"
    assert sigs["serving_open"]["inputs"]["class_attributes"]["shape"] == [-1, -1]
    for name in ("serving_default", "serving_maps", "serving_images", "serving_open", "serving_open_sided"):
        assert sorted(sigs[name]["outputs"]) == sorted(serving_export.PREDICTION_OUTPUTS)
        assert sigs[name]["outputs"]["gzsl_class"]["dtype"] == "DT_INT64"
    cli = report["saved_model_cli"]
    if "skipped" not in cli:
        assert cli["ok"] and cli["signatures"] == sorted(sigs)


def test_verify_report_passes_for_every_signature(report):
    assert report["ok"], verify.report_markdown(report)
    checked = {c["signature"] for c in report["checks"]}
    assert checked == {
        "serving_default",
        "serving_maps",
        "serving_images",
        "metadata",
        "serving_open",
        "serving_open_sided",
    }
    open_checks = {(c["signature"], c["output"]) for c in report["checks"] if c["signature"].startswith("serving_open")}
    assert ("serving_open_sided", "scores") in open_checks and ("serving_open", "attribute_scores") in open_checks
    assert ("serving_open", "refuses a wrong attribute count") in open_checks
    assert "| serving_images" in verify.report_markdown(report)


def test_cc_outputs_equal_keras_and_gamma_is_baked_in(setup, cc_default):
    out, gamma, b = cc_default, setup["gamma"], setup["flipped"]
    scores = _scores(setup["model"], setup["regions"])
    tol = 1e-4 * max(1.0, np.abs(scores).max())
    np.testing.assert_allclose(out["scores"], scores, atol=tol)
    want = gzsl_predictions(scores, SEEN, gamma)
    np.testing.assert_array_equal(out["gzsl_class"], want)
    uncalibrated = gzsl_predictions(scores, SEEN, 0.0)
    assert uncalibrated[b] in SEEN and out["gzsl_class"][b] in UNSEEN  # the crafted case flips
    assert out["gzsl_class"][b] != uncalibrated[b]
    np.testing.assert_array_equal(out["czsl_class"], czsl_predictions(scores, UNSEEN))
    assert set(out["czsl_class"].tolist()) <= set(UNSEEN)
    assert out["top_k_classes"].shape == (6, TOP_K) and out["top_k_classes"].dtype == np.int64
    np.testing.assert_array_equal(out["top_k_classes"][:, 0], out["gzsl_class"])
    ref = serving_export.reference_predictions(scores, SEEN, UNSEEN, gamma, TOP_K)
    np.testing.assert_array_equal(out["top_k_classes"], ref["top_k_classes"])
    np.testing.assert_allclose(out["top_k_scores"], ref["top_k_scores"], atol=tol)
    assert np.all(np.diff(out["top_k_scores"], axis=1) <= 0)


def test_cc_maps_and_images_signatures(setup, cc_binary, cc_default):
    maps = cc_loader.run_signature(setup["dir"], "serving_maps", {"feature_maps": setup["maps"]}, binary=cc_binary)
    for key in serving_export.PREDICTION_OUTPUTS:
        np.testing.assert_allclose(maps[key], cc_default[key], atol=1e-5, err_msg=key)
    imgs = cc_loader.run_signature(setup["dir"], "serving_images", {"images": setup["images"]}, binary=cc_binary)
    want = setup["image_scores"]
    np.testing.assert_allclose(imgs["scores"], want, atol=1e-4 * max(1.0, np.abs(want).max()))
    np.testing.assert_array_equal(imgs["czsl_class"], czsl_predictions(want, UNSEEN))
    with pytest.raises(cc_loader.CcLoaderError, match="not a JPEG, PNG, BMP or WebP image"):
        cc_loader.run_signature(setup["dir"], "serving_images", {"images": [b"not an image"]}, binary=cc_binary)


def test_preprocessing_matches_extract(tmp_path):
    from msdn_tf.backbones.keras_resnet import load_image as _load_image

    for i, (h, w) in enumerate([(50, 70), (81, 40)]):
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        data = tf.io.encode_png(pixels).numpy()
        (tmp_path / f"{i}.png").write_bytes(data)
        a = serving_export.preprocess_encoded_image(tf.constant(data), 32).numpy()
        b = _load_image(tf.constant(str(tmp_path / f"{i}.png")), 32).numpy()
        np.testing.assert_array_equal(a, b)


def test_refuses_to_overwrite_and_checks_arguments(setup):
    kwargs = dict(class_names=NAMES, seen_classes=SEEN, unseen_classes=UNSEEN)
    with pytest.raises(MSDNError, match="already exists"):
        serving_export.export_saved_model(setup["model"], setup["base"], version=1, **kwargs)
    with pytest.raises(MSDNError, match="11 class names"):
        serving_export.export_saved_model(
            setup["model"], setup["base"], version=9, class_names=NAMES[:-1], seen_classes=SEEN, unseen_classes=UNSEEN
        )
    with pytest.raises(MSDNError, match="differ from the model"):
        serving_export.export_saved_model(
            setup["model"],
            setup["base"],
            version=9,
            class_names=NAMES,
            seen_classes=SEEN[1:],
            unseen_classes=UNSEEN + SEEN[:1],
        )
    wrong_width = keras.Sequential([keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)), keras.layers.Conv2D(5, 8, 8)])
    with pytest.raises(MSDNError, match="backbone must map"):
        serving_export.export_saved_model(
            setup["model"], setup["base"], version=9, backbone=wrong_width, image_size=IMAGE_SIZE, **kwargs
        )
    assert not (setup["base"] / "9").exists()


@pytest.mark.slow
def test_export_cli_from_run_dir(setup, tmp_path, capsys):
    """The CLI on a run directory: gamma 0 export + default C++ check; refuse / allow overwrite."""
    run = _run_dir(setup["model"], tmp_path / "run")
    out = tmp_path / "models" / "msdn_tiny"
    rc = export.main(
        ["--run", str(run), "--out", str(out), "--top-k", "4", "--verify-samples", "2", "--image-size", "128"]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "result: OK" in captured.out and "serving_maps" in captured.out
    meta = serving_export.read_metadata(out)
    assert meta["gamma"] == 0.0 and meta["top_k"] == 4 and meta["config"]["data"]["dataset"] == "demo"
    # gamma 0 answers the crafted sample with the seen class; the gamma export with an unseen one.
    loaded = tf.saved_model.load(str(out / "1"))
    got = loaded.signatures["serving_default"](features=tf.constant(setup["regions"]))
    b = setup["flipped"]
    assert int(got["gzsl_class"][b]) in SEEN
    assert int(got["top_k_classes"].shape[1]) == 4

    assert export.main(["--run", str(run), "--out", str(out), "--no-verify"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert export.main(["--run", str(run), "--out", str(out), "--no-verify", "--overwrite", "--gamma", "2"]) == 0
    assert serving_export.read_metadata(out / "1")["gamma"] == 2.0
    assert sorted(p.name for p in out.iterdir()) == ["1", serving_export.METADATA_FILE]
    assert export.main(["--run", str(run), "--out", str(out), "--with-images", "--backbone-weights", "none"]) == 2
    assert "2048 channels" in capsys.readouterr().err
    assert export.main(["--run", str(tmp_path / "nope"), "--out", str(out)]) == 2


# ------------------------------------------------------------------------------ clients + test double


def _expected_names(scores, k=TOP_K, gamma=0.0):
    ref = serving_export.reference_predictions(scores, SEEN, UNSEEN, gamma, k)
    return [[NAMES[c] for c in row] for row in ref["top_k_classes"]]


def _names(answer):
    return [[t["name"] for t in r["top_k"]] for r in answer["results"]]


def test_client_library_grpc_and_rest_agree(setup, server):
    meta = serving_export.read_metadata(setup["base"])
    want = _expected_names(_scores(setup["model"], setup["regions"]), gamma=setup["gamma"])
    by_grpc = classify.classify(model=MODEL_NAME, server=server.grpc_address, features=setup["regions"], metadata=meta)
    by_rest = classify.classify(model=MODEL_NAME, rest=server.rest_url, features=setup["maps"])  # metadata signature
    assert _names(by_grpc) == want and _names(by_rest) == want
    assert by_rest["signature"] == "serving_maps" and by_grpc["signature"] == "serving_default"
    b = setup["flipped"]
    assert by_grpc["results"][b]["gzsl"]["unseen"] is True
    assert all(r["czsl"]["class"] in UNSEEN for r in by_grpc["results"])
    more = classify.classify(
        model=MODEL_NAME, server=server.grpc_address, features=setup["regions"], metadata=meta, top_k=6
    )
    assert _names(more) == _expected_names(_scores(setup["model"], setup["regions"]), k=6, gamma=setup["gamma"])


def test_client_images_grpc_and_rest_agree(setup, server):
    want = _expected_names(setup["image_scores"], gamma=setup["gamma"])
    meta = serving_export.read_metadata(setup["base"])
    a = classify.classify(model=MODEL_NAME, server=server.grpc_address, images=setup["images"], metadata=meta)
    b = classify.classify(model=MODEL_NAME, rest=server.rest_url, images=setup["images"], metadata=meta)
    assert _names(a) == _names(b) == want


def test_client_cli(setup, server, tmp_path, capsys):
    np.save(tmp_path / "x.npy", setup["regions"][:2])
    meta = str(setup["base"] / serving_export.METADATA_FILE)
    want = _expected_names(_scores(setup["model"], setup["regions"][:2]), gamma=setup["gamma"])
    answers = []
    for transport in (["--server", server.grpc_address], ["--rest", server.rest_url]):
        rc = client.main(
            transport + ["--model", MODEL_NAME, "--features", str(tmp_path / "x.npy"), "--metadata", meta, "--json"]
        )
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        answers.append(json.loads(captured.out))
    assert _names(answers[0]) == _names(answers[1]) == want
    paths = []
    for i, data in enumerate(setup["images"]):
        paths.append(str(tmp_path / f"img{i}.{'png' if i % 2 == 0 else 'jpg'}"))
        with open(paths[-1], "wb") as fh:
            fh.write(data)
    assert (
        client.main(["--server", server.grpc_address, "--model", MODEL_NAME, "--images", *paths, "--top-k", "2"]) == 0
    )
    text = capsys.readouterr().out
    first = _expected_names(setup["image_scores"], gamma=setup["gamma"])[0]
    assert f"{paths[0]}: GZSL" in text and f"1. {first[0]}" in text
    # errors: unknown model, wrong feature width, missing file
    assert (
        client.main(
            [
                "--server",
                server.grpc_address,
                "--model",
                "other",
                "--features",
                str(tmp_path / "x.npy"),
                "--metadata",
                meta,
            ]
        )
        == 2
    )
    assert "NOT_FOUND" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.zeros((1, 16, F + 1), np.float32))
    assert (
        client.main(
            [
                "--server",
                server.grpc_address,
                "--model",
                MODEL_NAME,
                "--features",
                str(tmp_path / "bad.npy"),
                "--metadata",
                meta,
            ]
        )
        == 2
    )
    assert f"expects {F}" in capsys.readouterr().err
    assert (
        client.main(["--server", server.grpc_address, "--model", MODEL_NAME, "--images", str(tmp_path / "missing.jpg")])
        == 2
    )


def test_client_reads_hdf5_rows(tmp_path):
    import h5py

    maps = np.random.default_rng(0).random((3, F, 2, 2)).astype(np.float32)
    with h5py.File(tmp_path / "f.hdf5", "w") as f:
        f["feature_map"] = maps
    x = classify.read_features(tmp_path / "f.hdf5", [2, 0], F)
    np.testing.assert_array_equal(x, maps[[2, 0]].transpose(0, 2, 3, 1))
    with pytest.raises(MSDNError, match="outside"):
        classify.read_features(tmp_path / "f.hdf5", [3], F)


def _raw(inputs, signature="serving_default"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("wrong_shape", grpc.StatusCode.INVALID_ARGUMENT, "expects shape"),
        ("wrong_rank", grpc.StatusCode.INVALID_ARGUMENT, "expects shape"),
        ("wrong_dtype", grpc.StatusCode.INVALID_ARGUMENT, "expects DT_FLOAT"),
        ("malformed_image", grpc.StatusCode.INVALID_ARGUMENT, "not a JPEG, PNG, BMP or WebP image"),
        # TF Serving answers FAILED_PRECONDITION 'Serving signature key "..." not found.' (kept by the test double)
        ("unknown_signature", grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "serving_nope" not found'),
    ],
)
def test_bad_requests_keep_the_server_answering(setup, server, case, code, message):
    x = setup["regions"]
    requests = {
        "wrong_shape": lambda: _raw({"features": np.zeros((2, 16, F + 3), np.float32)}),
        "wrong_rank": lambda: _raw({"features": np.zeros((16, F), np.float32)}),
        "wrong_dtype": lambda: _raw({"features": x.astype(np.float64)}),
        "malformed_image": lambda: _raw(
            {"images": np.array([setup["images"][0], b"\xff\xd8garbage"], dtype=object)}, signature="serving_images"
        ),
        "unknown_signature": lambda: _raw({"features": x}, signature="serving_nope"),
    }
    channel = grpc.insecure_channel(server.grpc_address)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(requests[case](), timeout=30)
        assert info.value.code() == code, info.value.details()
        assert message in info.value.details()
        response = stub.Predict(_raw({"features": x}), timeout=30)
        np.testing.assert_array_equal(
            tf.make_ndarray(response.outputs["gzsl_class"]),
            gzsl_predictions(_scores(setup["model"], x), SEEN, setup["gamma"]),
        )
    finally:
        channel.close()


# ------------------------------------------------------------------------------ benchmark


def test_bench_reports_numbers(setup, capsys):
    assert (
        bench.main(
            [
                "--export",
                str(setup["base"]),
                "--batches",
                "1",
                "3",
                "--iterations",
                "2",
                "--warmup",
                "1",
                "--regions",
                "16",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert [r["batch"] for r in report["results"]] == [1, 3]
    assert report["feature_dim"] == F and report["export_dir"].endswith("1")
    for r in report["results"]:
        assert r["p99_ms"] >= r["p50_ms"] > 0 and r["images_per_s"] > 0
    assert bench.main(["--export", str(setup["base"] / "nope")]) == 2


def test_rest_bad_requests_keep_the_server_answering(setup, server):
    from msdn_tf.serving import client_lib

    bad = [
        ({"features": np.zeros((1, 16, F + 1), np.float32)}, "serving_default", "expects shape"),
        ({"features": setup["regions"]}, "serving_nope", "not found"),
        ({"images": [b"\x89PNG not really"]}, "serving_images", "not a JPEG, PNG, BMP or WebP image"),
    ]
    for inputs, signature, message in bad:
        with pytest.raises(client_lib.PredictError) as info:
            client_lib.predict_rest(server.rest_url, MODEL_NAME, inputs, signature_name=signature)
        assert info.value.http_status == 400 and message in info.value.message
    out = client_lib.predict_rest(server.rest_url, MODEL_NAME, {"features": setup["regions"]})
    np.testing.assert_array_equal(
        out["gzsl_class"], gzsl_predictions(_scores(setup["model"], setup["regions"]), SEEN, setup["gamma"])
    )


# ------------------------------------------------------------------------------ failures (issue 14)


def _run_dir(model, path):
    from msdn_tf.config import Config, save_config

    path.mkdir()
    save_config(Config(), path / "config.yaml")
    model.save(path / "model.keras")
    (path / "metadata.json").write_text(json.dumps({"class_names": NAMES}))
    return path


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_temporaries(tmp_path):
    base = tmp_path / "m"
    (base / "1").mkdir(parents=True)
    dead = _dead_pid()
    (base / f".tmp-1-{dead}-abc").mkdir()
    (base / f".tmp-1-{dead}-abc" / "saved_model.pb").write_bytes(b"x" * 2000)
    (base / ".tmp-2-oldformat").mkdir()  # written before the pid was part of the name
    (base / f".tmp-3-{os.getppid()}-xyz").mkdir()  # a running export: left alone
    (base / f".old-5-{dead}-q").mkdir()  # killed between the two renames of --overwrite: 5 is missing
    (base / f".old-5-{dead}-q" / "saved_model.pb").write_bytes(b"v5")
    (base / f".old-1-{dead}-r").mkdir()  # 1 exists: the old copy is stale
    lines = serving_export.remove_stale_temporaries(base)
    assert sorted(p.name for p in base.iterdir()) == sorted(["1", "5", f".tmp-3-{os.getppid()}-xyz"])
    assert (base / "5" / "saved_model.pb").read_bytes() == b"v5"
    text = "\n".join(lines)
    assert f"removed {base / f'.tmp-1-{dead}-abc'} (0.0 MB)" in text and f"process {dead}, no longer running" in text
    assert f"restored {base / '5'}" in text and "still running" in text and len(lines) == 5


@pytest.mark.slow
def test_failed_check_publishes_nothing_and_keeps_the_previous_version(setup, tmp_path, capsys, monkeypatch):
    """The CLI: a version is renamed into place only after its check passed; stale temporaries are removed."""
    run = _run_dir(setup["model"], tmp_path / "run")
    out = tmp_path / "models" / "msdn_tiny"
    assert export.main(["--run", str(run), "--out", str(out), "--no-verify", "--gamma", "0.25"]) == 0
    stale = out / f".tmp-1-{_dead_pid()}-k"
    stale.mkdir()
    other = _tiny_model(seed=1)  # the check compares the export with a different model: it must fail
    real_verify = verify.verify_export
    monkeypatch.setattr(verify, "verify_export", lambda d, model, *a, **k: real_verify(d, other, *a, **k))
    capsys.readouterr()
    rc = export.main(
        [
            "--run",
            str(run),
            "--out",
            str(out),
            "--overwrite",
            "--gamma",
            "3",
            "--verify-samples",
            "2",
            "--image-size",
            "128",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 1, captured.err
    assert f"{out / '1'} was not published: the export failed its check" in captured.err
    assert "NOT published" in captured.out and "result: FAILED" in captured.out
    assert f"removed {stale}" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["1", serving_export.METADATA_FILE]  # no .tmp-*, no .old-*
    assert (
        serving_export.read_metadata(out / "1")["gamma"] == 0.25 and serving_export.read_metadata(out)["gamma"] == 0.25
    )
    rc = export.main(
        ["--run", str(run), "--out", str(out), "--version", "2", "--verify-samples", "2", "--image-size", "128"]
    )
    assert rc == 1 and not (out / "2").exists()


@pytest.mark.parametrize("failure", ["enospc", "tf_resource_exhausted", "read_only"])
def test_disk_full_or_read_only_is_one_line_and_exit_2(setup, tmp_path, capsys, monkeypatch, failure):
    import errno

    run = tmp_path / "run"
    if not run.exists():
        _run_dir(setup["model"], run)
    out = tmp_path / "models" / "msdn_tiny"
    assert export.main(["--run", str(run), "--out", str(out), "--no-verify"]) == 0
    before = (out / "1" / "saved_model.pb").read_bytes()

    def full(self, path, **kwargs):
        os.makedirs(os.path.join(path, "variables"), exist_ok=True)  # half written, as a real ENOSPC leaves it
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(path, "variables", "x.data"))
        raise tf.errors.ResourceExhaustedError(None, None, f"{path}/variables/x.data; No space left on device")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(out / ".tmp-1-x"))

    if failure == "read_only":
        monkeypatch.setattr(serving_export.tempfile, "mkdtemp", read_only)
    else:
        monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", full)  # the backend's class
    capsys.readouterr()
    rc = export.main(["--run", str(run), "--out", str(out), "--overwrite", "--no-verify"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write the export to ") and "Traceback" not in err
    assert {
        "enospc": "the disk is full",
        "tf_resource_exhausted": "the disk is full",
        "read_only": "the file system is read-only",
    }[failure] in err
    assert str(out) in err and ("free disk space" in err if failure != "read_only" else "pass a writable --out" in err)
    assert "are unchanged; no partial export is left" in err
    assert sorted(p.name for p in out.iterdir()) == ["1", serving_export.METADATA_FILE]
    assert (out / "1" / "saved_model.pb").read_bytes() == before


def test_signatures_refuse_what_they_cannot_answer_in_cpp(setup, cc_binary, report):
    """The guards are inside the SavedModel: TF's C++ loader (TF Serving's) refuses NaN, inf, empty inputs."""
    x = setup["regions"][:2].copy()
    x[1, 3, 5] = np.nan
    cases = [
        ("serving_default", {"features": x}, "NaN or inf in input features"),
        (
            "serving_maps",
            {"feature_maps": np.full((1, 2, 2, F), np.inf, np.float32)},
            "NaN or inf in input feature_maps",
        ),
        ("serving_default", {"features": np.zeros((0, 16, F), np.float32)}, "empty batch in input features"),
        ("serving_default", {"features": np.zeros((2, 0, F), np.float32)}, "zero regions in input features"),
        ("serving_maps", {"feature_maps": np.zeros((2, 0, 4, F), np.float32)}, "zero regions in input feature_maps"),
    ]
    for sig, inputs, message in cases:
        with pytest.raises(cc_loader.CcLoaderError, match="InvalidArgument|INVALID_ARGUMENT|Session::Run") as info:
            cc_loader.run_signature(setup["dir"], sig, inputs, binary=cc_binary)
        assert message in str(info.value), (sig, str(info.value)[:500])
    row = [c for c in report["checks"] if c["output"] == "refuses a NaN input"]
    assert row and row[0]["ok"], row


@pytest.mark.parametrize(
    "case, message",
    [
        ("nan", "NaN or inf in input features"),
        ("inf_maps", "NaN or inf in input feature_maps"),
        ("empty_batch", "empty batch in input features"),
        ("zero_regions", "zero regions in input features"),
    ],
)
def test_grpc_refuses_what_the_model_cannot_answer(setup, server, case, message):
    """INVALID_ARGUMENT raised by the exported signature itself (the test double does not check values)."""
    from msdn_tf.serving import client_lib

    x = setup["regions"].copy()
    x[2, 0, 0] = np.nan
    inputs, signature = {
        "nan": ({"features": x}, "serving_default"),
        "inf_maps": ({"feature_maps": np.where(setup["maps"] > 0, np.inf, 0).astype(np.float32)}, "serving_maps"),
        "empty_batch": ({"features": np.zeros((0, 16, F), np.float32)}, "serving_default"),
        "zero_regions": ({"features": np.zeros((3, 0, F), np.float32)}, "serving_default"),
    }[case]
    with pytest.raises(client_lib.PredictError) as info:
        client_lib.predict_grpc(server.grpc_address, MODEL_NAME, inputs, signature_name=signature)
    assert info.value.code == "INVALID_ARGUMENT" and message in info.value.message, info.value.message


@pytest.mark.parametrize("number", ["1e39", "-1e39", "1e400", "NaN", "Infinity"])
def test_rest_out_of_range_json_number_is_400(setup, server, number):
    import urllib.error
    import urllib.request

    rows = [[0.5] * F for _ in range(16)]
    body = json.dumps({"inputs": {"features": [rows]}}).replace("0.5", number, 1).encode()
    req = urllib.request.Request(f"{server.rest_url}/v1/models/{MODEL_NAME}:predict", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 400
    assert "NaN or inf in input features" in json.loads(info.value.read())["error"]


def _client_cli(args, capsys):
    rc = client.main(args)
    captured = capsys.readouterr()
    return rc, captured.err


def test_client_one_line_errors(setup, server, tmp_path, capsys):
    np.save(tmp_path / "x.npy", setup["regions"][:1])
    x = str(tmp_path / "x.npy")
    (tmp_path / "text.npy").write_text("0.1 0.2 0.3\n")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    meta = str(setup["base"] / serving_export.METADATA_FILE)
    cases = [
        (["--rest", f"http://{server.grpc_address}", "--features", x], "is it the gRPC port?"),
        (["--server", server.rest_url[len("http://") :], "--features", x], "is it the REST port?"),
        (["--server", "127.0.0.1:1", "--features", x], "no TF Serving answer from 127.0.0.1:1"),
        (["--rest", "http://127.0.0.1:1", "--features", x], "no TF Serving answer from http://127.0.0.1:1"),
        (
            ["--server", server.grpc_address, "--features", str(tmp_path / "text.npy"), "--metadata", meta],
            "not a .npy file",
        ),
        (
            ["--server", server.grpc_address, "--features", str(tmp_path / "objects.npy"), "--metadata", meta],
            "holds Python objects",
        ),
    ]
    for args, message in cases:
        rc, err = _client_cli(args + ["--model", MODEL_NAME, "--timeout", "10"], capsys)
        assert rc == 2, (args, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, err)
        assert "--metadata" not in err and "pickle" not in err and "Traceback" not in err, (args, err)


def test_client_rows_and_metadata_errors_are_one_line(setup, server, tmp_path, capsys):
    """--rows out of range and metadata that does not fit the model: one line each, no traceback."""
    np.save(tmp_path / "x.npy", setup["regions"][:2])
    x = str(tmp_path / "x.npy")
    good = json.loads((setup["base"] / serving_export.METADATA_FILE).read_text())

    def meta_file(name, **changes):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**good, **changes}))
        return str(path)

    few = meta_file("few", class_names=good["class_names"][:3], num_classes=3, seen_classes=[0], unseen_classes=[1])
    cases = [
        (["--features", x, "--rows", "5"], "rows [5] outside [0, 2)"),
        (["--features", x, "--rows", "-1"], "rows [-1] outside [0, 2)"),
        (["--features", x, "--metadata", few], "the served model scores 12 classes but the metadata names 3"),
        (["--features", x, "--metadata", meta_file("ids", seen_classes=[0, 99])], "'seen_classes' holds ids [99]"),
        (["--features", x, "--metadata", meta_file("gamma", gamma="high")], "'gamma' must be a finite number"),
        (["--features", x, "--metadata", meta_file("names", class_names=[1, 2])], "'class_names' must be"),
        (["--features", x, "--top-k", "0"], "--top-k must be >= 1"),
        (["--features", x, "--timeout", "0"], "--timeout must be > 0"),
    ]
    for transport in (["--server", server.grpc_address], ["--rest", server.rest_url]):
        for args, message in cases:
            rc, err = _client_cli(transport + args + ["--model", MODEL_NAME], capsys)
            lines = [line for line in err.splitlines() if line.strip()]
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, err)


def test_rest_client_does_not_import_tensorflow(setup, server, tmp_path):
    """The REST path needs no TensorFlow (it took 9 s to start for a 5 ms request)."""
    import subprocess
    import sys

    from msdn_tf.utils import subprocess_env
    from tests.helpers import REPO

    np.save(tmp_path / "x.npy", setup["regions"][:1])
    code = (
        "import sys; from msdn_tf.cli import client; "
        f"rc = client.main(['--rest', {server.rest_url!r}, '--model', {MODEL_NAME!r}, '--features', "
        f"{str(tmp_path / 'x.npy')!r}, '--json']); "
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'grpc', 'h5py') if m in sys.modules); "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    env = subprocess_env({**os.environ, "PYTHONPATH": str(REPO)})
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    answer = json.loads(done.stdout.split("HEAVY")[0])
    want = _expected_names(_scores(setup["model"], setup["regions"][:1]), gamma=setup["gamma"])
    assert _names(answer) == want


def test_each_weight_is_stored_once(setup):
    """ExportArchive checkpointed every weight twice (_all_variables/* and variables/*): 333 MB for 170 MB."""
    keys = tf.train.list_variables(os.path.join(setup["dir"], "variables", "variables"))
    stored = sum(int(np.prod(shape)) for name, shape in keys if name != "_CHECKPOINTABLE_OBJECT_GRAPH")
    weights = sum(int(np.prod(w.shape)) for w in setup["model"].weights + setup["backbone"].weights)
    assert stored == weights, (stored, weights, sorted({k.split("/")[0] for k, _ in keys}))
    loaded = tf.saved_model.load(str(setup["dir"]))
    assert len(loaded.variables) == len(setup["model"].weights) + len(setup["backbone"].weights)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels and holds one tiny IDAT (it would not decode)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _pil_bytes(array, fmt: str) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt)
    return out.getvalue()


def _image_cases():
    rng = np.random.default_rng(5)
    photo = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    thin = _pil_bytes(rng.integers(0, 256, (1, 20000, 3), dtype=np.uint8), "PNG")  # the 20000 x 1 PNG
    return {
        "huge": ([_png_header(12000, 12000)], "is 12000 x 12000 pixels (width x height): at most 16777216 pixels"),
        "thin": ([thin], "is 20000 x 1 pixels (width x height): each side must be at least 16 pixels"),
        "wide": (
            [_pil_bytes(rng.integers(0, 256, (20, 400, 3), dtype=np.uint8), "PNG")],
            "the longer side may be at most 10 times the shorter one",
        ),
        "tiny": ([_pil_bytes(photo[:1, :1], "PNG")], "is 1 x 1 pixels"),
        "blank": ([_pil_bytes(np.full((40, 60, 3), 200, np.uint8), "JPEG")], "is blank (every pixel the same colour)"),
        "gif": ([_pil_bytes(photo, "GIF")], "is a GIF: not accepted"),
        "together": (
            [_pil_bytes(photo, "BMP")] + [_png_header(4000, 4000)] * 5,
            "the 6 images of this request have 80002400 pixels together: at most 67108864",
        ),
        "second": ([_pil_bytes(photo, "PNG"), _png_header(12000, 12000)], "image 1 of the request is 12000 x 12000"),
    }


def test_image_limits_are_checked_in_the_exported_graph(setup, server):
    """Decoded size, aspect ratio, 1x1 and blank images are refused by serving_images itself, before decoding."""
    from msdn_tf.serving import client_lib

    for name, (images, message) in _image_cases().items():
        with pytest.raises(client_lib.PredictError) as info:
            client_lib.predict_grpc(
                server.grpc_address, MODEL_NAME, {"images": images}, signature_name="serving_images"
            )
        assert info.value.code == "INVALID_ARGUMENT" and message in info.value.message, (name, info.value.message)
    # formats that pass: PNG, JPEG, BMP and WebP photographs
    rng = np.random.default_rng(6)
    photo = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    images = [_pil_bytes(photo, fmt) for fmt in ("PNG", "JPEG", "BMP", "WEBP")]
    out = client_lib.predict_grpc(server.grpc_address, MODEL_NAME, {"images": images}, signature_name="serving_images")
    assert out["scores"].shape == (4, C) and np.isfinite(out["scores"]).all()


def test_image_limits_hold_in_the_cpp_loader(setup, cc_binary):
    """The same refusals through TensorFlow's C++ SavedModel loader, the one TF Serving uses."""
    cases = _image_cases()
    for name in ("huge", "thin", "blank"):
        images, message = cases[name]
        with pytest.raises(cc_loader.CcLoaderError) as info:
            cc_loader.run_signature(setup["dir"], "serving_images", {"images": images}, binary=cc_binary)
        assert message in str(info.value), (name, str(info.value)[:500])
