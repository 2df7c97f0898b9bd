"""torchvision-layout ResNet + reference preprocessing against fixtures written by real torch/torchvision.

Fixtures (tests/fixtures/make_backbone_fixtures.py, torch 2.14.1, torchvision 0.29.1,
Pillow 12.3.0): a torchvision ``ResNet`` with Bottleneck blocks (1, 2, 1, 1) and base
width 4, as a state_dict and inside an MSDN-style checkpoint (``resnet101.<child>.*``),
three small images and torchvision's preprocessed tensors and feature maps at size 64.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from msdn_tf.backbones import preprocessing as pre
from msdn_tf.backbones.torchvision_resnet import (
    build_torchvision_resnet,
    expected_state_shapes,
    load_backbone_file,
    load_torchvision_weights,
    normalize_backbone_keys,
)
from msdn_tf.errors import DataError
from msdn_tf.interop.torch_checkpoint import read_torch_state_dict
from tests import reference_numpy as ref
from tests.helpers import TORCH_FIXTURES

BLOCKS, WIDTH, SIZE = (1, 2, 1, 1), 4, 64
IMAGES = ("photo.jpg", "wide.png", "gray.png")
IMG_DIR = os.path.join(TORCH_FIXTURES, "tiny_tv_images")
TV_PTH = os.path.join(TORCH_FIXTURES, "tiny_tv_resnet.pth")
MSDN_PTH = os.path.join(TORCH_FIXTURES, "tiny_msdn_with_resnet.pth")
PILLOW_MAJOR = int(Image.__version__.split(".")[0])


@pytest.fixture(scope="module")
def tv():
    with np.load(os.path.join(TORCH_FIXTURES, "tiny_tv_expected.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def tiny_model():
    model, info = load_backbone_file(TV_PTH, blocks=BLOCKS, width=WIDTH)
    assert info["format"] == "torchvision_state_dict" and info["tensors"] == 100
    return model


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------ preprocessing


def test_output_size_and_crop_follow_torchvision():
    assert pre.resized_size(375, 500, 448) == (448, 597)
    assert pre.resized_size(500, 333, 448) == (672, 448)  # int(448 * 500 / 333) = 672 (truncated)
    assert pre.resized_size(448, 448, 448) == (448, 448)
    assert pre.center_crop_offsets(448, 597, 448) == (0, 74)  # round(74.5) = 74, half to even
    assert pre.center_crop_offsets(448, 599, 448) == (0, 76)  # round(75.5) = 76


@pytest.mark.parametrize("name", IMAGES)
def test_preprocessing_equals_torchvision_bit_for_bit(tv, name):
    path = os.path.join(IMG_DIR, name)
    img = pre.load_image(path)
    resized = pre.pil_resize(img, *pre.resized_size(*img.shape[:2], SIZE))
    np.testing.assert_array_equal(resized, tv["resize::" + name])
    x = pre.load_and_preprocess(path, SIZE)
    np.testing.assert_array_equal(x, tv["pre::" + name].transpose(1, 2, 0))


def test_pil_resize_matches_pillow_per_axis():
    rng = np.random.default_rng(0)
    for _ in range(12):
        h, w = rng.integers(2, 300, 2)
        n = int(rng.integers(1, 400))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want_w = np.asarray(Image.fromarray(img).resize((n, int(h)), Image.BILINEAR))
        want_h = np.asarray(Image.fromarray(img).resize((int(w), n), Image.BILINEAR))
        np.testing.assert_array_equal(pre.pil_resize(img, int(h), n), want_w)
        np.testing.assert_array_equal(pre.pil_resize(img, n, int(w)), want_h)


def test_fast_resize_equals_the_exact_account_on_any_pillow():
    # The extraction path resizes with Pillow in two one-axis passes (C, no GIL); it must
    # equal pil_resize (Pillow 4.3-12.x's 2-D behaviour) bit for bit, also on Pillow 13.
    rng = np.random.default_rng(2)
    sizes = [(375, 500, 448, 597), (500, 375, 597, 448), (448, 600, 448, 600), (17, 900, 448, 23717)]
    sizes += [tuple(int(v) for v in rng.integers(2, 400, 4)) for _ in range(12)]
    for h, w, nh, nw in sizes:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(pre._pillow_resize(img, nh, nw), pre.pil_resize(img, nh, nw), err_msg=str((h, w)))


@pytest.mark.skipif(
    PILLOW_MAJOR >= 13,
    reason="Pillow 13 changed the pass order of 2-D resizes for some sizes; "
    "the 4.3-12.x behaviour (horizontal first) is checked against tiny_tv_expected.npz instead",
)
def test_pil_resize_matches_pillow_2d():
    rng = np.random.default_rng(1)
    for _ in range(12):
        h, w, nh, nw = (int(v) for v in rng.integers(2, 400, 4))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(
            pre.pil_resize(img, nh, nw), np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
        )


def test_in_graph_resize_and_preprocessing_equal_numpy():
    import tensorflow as tf

    rng = np.random.default_rng(2)
    for h, w, nh, nw in [(75, 100, 64, 85), (600, 40, 300, 90), (31, 33, 448, 477), (64, 64, 64, 64)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(pre.tf_pil_resize(tf.constant(img), nh, nw).numpy(), pre.pil_resize(img, nh, nw))
    for name in IMAGES:
        with open(os.path.join(IMG_DIR, name), "rb") as fh:
            encoded = tf.constant(fh.read())
        got = pre.tf_preprocess_encoded(encoded, SIZE).numpy()
        np.testing.assert_array_equal(got, pre.load_and_preprocess(os.path.join(IMG_DIR, name), SIZE))


# ------------------------------------------------------------------------------ network + weights


def test_architecture_names_and_shapes():
    shapes = expected_state_shapes()
    assert len(shapes) == 520  # 104 convs + 4 x 104 BN tensors (626 keys minus fc.* and num_batches_tracked)
    assert shapes["layer3.22.bn3.running_var"] == (1024,)
    net = build_torchvision_resnet(blocks=BLOCKS, width=WIDTH, image_size=SIZE)
    assert net.output_shape == (None, 2, 2, 128)
    assert net.get_layer("layer2.0.conv2").strides == (2, 2)  # v1.5: stride on the 3x3
    assert net.get_layer("layer2.0.conv1").strides == (1, 1)
    assert net.get_layer("bn1").epsilon == 1e-5


@pytest.mark.parametrize("path", [TV_PTH, MSDN_PTH])
def test_feature_maps_equal_torchvision(tv, path):
    model, info = load_backbone_file(path, blocks=BLOCKS, width=WIDTH)
    assert info["format"] == ("msdn_checkpoint" if path == MSDN_PTH else "torchvision_state_dict")
    x = np.stack([tv["pre::" + n].transpose(1, 2, 0) for n in IMAGES])
    maps = np.asarray(model(x, training=False))
    for i, n in enumerate(IMAGES):
        assert rel_l2(maps[i].transpose(2, 0, 1), tv["map::" + n]) < 1e-5, n


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_inference_trunk_folds_batch_norm_exactly_enough(tv, tiny_model, dtype):
    from msdn_tf.backbones.torchvision_resnet import inference_trunk

    fast = inference_trunk(tiny_model, dtype)
    assert not any("bn" in layer.name for layer in fast.layers)  # every BatchNormalization folded
    assert fast.output_shape == tiny_model.output_shape
    x = np.stack([tv["pre::" + n].transpose(1, 2, 0) for n in IMAGES])
    maps = np.asarray(fast.predict_on_batch(x))
    assert maps.dtype == np.float32
    tol = 1e-5 if dtype == "float32" else 3e-2  # bfloat16 products: about 1 % (docs/data.md)
    for i, n in enumerate(IMAGES):
        assert rel_l2(maps[i].transpose(2, 0, 1), tv["map::" + n]) < tol, n


def test_weight_errors_name_the_key(tmp_path, tiny_model):
    state = normalize_backbone_keys(read_torch_state_dict(TV_PTH), "x")
    # other depth (as a ResNet-50 file is for ResNet-101): unexpected/missing keys are named
    with pytest.raises(DataError, match=r"blocks \[1, 1, 1, 1\].*unexpected 15 tensor\(s\), e\.g\. \['layer2\.1"):
        load_torchvision_weights(build_torchvision_resnet((1, 1, 1, 1), WIDTH), state, "r50.pth")
    with pytest.raises(DataError, match=r"r.pth: 'conv1.weight' has shape \(4, 3, 7, 7\), expected \(8, 3, 7, 7\)"):
        load_torchvision_weights(build_torchvision_resnet(BLOCKS, 8), state, "r.pth")
    broken = dict(state)
    del broken["layer3.0.bn2.running_mean"]
    with pytest.raises(DataError, match=r"missing 1 tensor\(s\), e\.g\. \['layer3\.0\.bn2\.running_mean'\]"):
        load_torchvision_weights(tiny_model, broken, "m.pth")
    broken = dict(state, **{"layer1.0.conv1.weight": np.full((4, 4, 1, 1), np.nan, np.float32)})
    with pytest.raises(DataError, match="'layer1.0.conv1.weight' holds NaN"):
        load_torchvision_weights(tiny_model, broken, "n.pth")
    with pytest.raises(DataError, match="child 2 of resnet101"):
        normalize_backbone_keys({"resnet101.2.weight": np.zeros(1)}, "c.pth")
    # the CLI default (ResNet-101) refuses the tiny file, naming missing tensors
    with pytest.raises(DataError, match=r"tiny_tv_resnet.pth: not the weights of a torchvision-layout ResNet-101"):
        load_backbone_file(TV_PTH)
    keras_h5 = tmp_path / "w.h5"
    keras_h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(DataError, match="w.h5 is an HDF5 \\(Keras .h5\\) file"):
        load_backbone_file(keras_h5)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(DataError, match="junk.pth is not a PyTorch zip checkpoint"):
        load_backbone_file(junk)


# ------------------------------------------------------------------------------ bad images


def _save(tmp_path, name, img, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return str(path)


def test_bad_images(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(DataError, match="bad.jpg: cannot read or decode the image"):
        pre.load_image(str(bad))
    with pytest.raises(DataError, match="absent.png: image file not found"):
        pre.load_image(str(tmp_path / "absent.png"))
    one = _save(tmp_path, "one.png", Image.new("RGB", (1, 1), (10, 20, 30)))
    with pytest.raises(DataError, match=r"one.png: image is 1x1; the shorter side must be at least 16"):
        pre.load_image(one)
    g16 = _save(tmp_path, "g16.png", Image.fromarray(np.full((20, 30), 40000, np.uint16)))
    with pytest.raises(DataError, match=r"g16.png: a I;16.* image"):
        pre.load_image(g16)
    monkeypatch.setattr(pre, "MAX_PIXELS", 100 * 100)
    big = _save(tmp_path, "big.png", Image.new("RGB", (101, 100)))
    with pytest.raises(DataError, match=r"big.png: image is 101x100 \(10100 pixels\), more than the 10000"):
        pre.load_image(big)


def test_documented_conversions(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    # CMYK JPEG, grayscale and RGBA: Pillow's convert("RGB"), as the reference
    for name, img in (
        ("c.jpg", Image.fromarray(rgb).convert("CMYK")),
        ("l.png", Image.fromarray(rgb).convert("L")),
        ("a.png", Image.fromarray(rgb).convert("RGBA")),
    ):
        path = _save(tmp_path, name, img)
        with Image.open(path) as im:
            want = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(pre.load_image(path), want)
    # 16-bit RGB PNG: Pillow reads it as 8-bit RGB (the high byte)
    import struct
    import zlib

    h, w = 17, 18
    px = (rng.integers(0, 65536, (h, w, 3))).astype(">u2")
    raw = b"".join(b"\0" + px[r].tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    path = tmp_path / "rgb16.png"
    path.write_bytes(png)
    np.testing.assert_array_equal(pre.load_image(str(path)), (px >> 8).astype(np.uint8))


# ------------------------------------------------------------------------------ extract / convert / export


def test_extract_torchvision_path_writes_reference_maps_and_resumes(tmp_path, tv, tiny_model):
    import h5py

    from msdn_tf.data import extraction

    out = tmp_path / "f.hdf5"
    names = list(IMAGES)

    class Stop(Exception):
        pass

    def stop_after_first(done):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        extraction.extract_features(
            names,
            out,
            backbone=tiny_model,
            images_root=IMG_DIR,
            batch_size=2,
            image_size=SIZE,
            preprocessing="torchvision",
            progress=False,
            backbone_id="tiny",
            after_batch=stop_after_first,
        )
    assert not out.exists() and os.path.exists(str(out) + ".partial")
    extraction.extract_features(
        names,
        out,
        backbone=tiny_model,
        images_root=IMG_DIR,
        batch_size=2,
        image_size=SIZE,
        preprocessing="torchvision",
        progress=False,
        backbone_id="tiny",
    )
    with h5py.File(out) as f:
        fm = f["feature_map"][:]
        assert fm.shape == (3, 128, 2, 2) and "Normalize" in f.attrs["preprocessing"]
    for i, n in enumerate(names):
        assert rel_l2(fm[i], tv["map::" + n]) < 1e-5, n


def test_extract_bfloat16_is_close_recorded_and_never_mixed_with_float32(tmp_path, tv, tiny_model):
    import h5py

    from msdn_tf.data import extraction

    out = tmp_path / "f.hdf5"
    kwargs = dict(
        backbone=tiny_model,
        images_root=IMG_DIR,
        batch_size=2,
        image_size=SIZE,
        preprocessing="torchvision",
        progress=False,
        backbone_id="tiny",
        log=lambda *a: None,
    )

    class Stop(Exception):
        pass

    def stop(done):
        raise Stop

    with pytest.raises(Stop):  # a float32 job interrupted after its first batch
        extraction.extract_features(list(IMAGES), out, after_batch=stop, **kwargs)
    with pytest.raises(DataError, match=r"partial extraction of a different job"):
        extraction.extract_features(list(IMAGES), out, precision="mixed_bfloat16", **kwargs)
    extraction.extract_features(list(IMAGES), out, precision="mixed_bfloat16", restart=True, **kwargs)
    with h5py.File(out) as f:
        fm = f["feature_map"][:]
        assert f.attrs["precision"] == "mixed_bfloat16" and f.attrs["backbone"] == "tiny:mixed_bfloat16"
    for i, n in enumerate(IMAGES):
        assert 1e-5 < rel_l2(fm[i], tv["map::" + n]) < 3e-2, n  # bfloat16 products: close, not equal
    with pytest.raises(Exception, match=r"float32, mixed_bfloat16 or auto"):
        extraction.extract_features(list(IMAGES), tmp_path / "g.hdf5", precision="mixed_float16", **kwargs)


def test_extract_cli_backbone_choice_and_errors(tmp_path, capsys):
    from msdn_tf.cli import extract
    from msdn_tf.data import extraction

    lst = tmp_path / "list.txt"
    lst.write_text("photo.jpg\n")
    base = ["--images-root", IMG_DIR, "--image-list", str(lst), "--out", str(tmp_path / "o.hdf5")]
    assert extract.main(base) == 2  # default torchvision_resnet101 needs --weights
    assert "needs --weights FILE" in capsys.readouterr().err
    assert extract.main(base + ["--weights", TV_PTH, "--no-progress"]) == 2
    assert "tiny_tv_resnet.pth: not the weights of a torchvision-layout ResNet-101" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(DataError, match="bad.jpg: cannot read or decode"):
        extraction.extract_features(
            [str(bad)],
            tmp_path / "b.hdf5",
            backbone=build_torchvision_resnet(BLOCKS, WIDTH),
            image_size=SIZE,
            preprocessing="torchvision",
            progress=False,
        )


def test_convert_stores_backbone_and_export_serves_images(tmp_path, tv):
    import tensorflow as tf

    from msdn_tf.evaluation.runs import load_run
    from msdn_tf.serving import export
    from msdn_tf.training.convert import BACKBONE_FILE, convert_checkpoint

    run = tmp_path / "run"
    report = convert_checkpoint(MSDN_PTH, "custom", run)
    assert report["backbone"]["stored"] == BACKBONE_FILE and report["backbone"]["loaded"] is True
    assert report["backbone"]["architecture"] == {"blocks": list(BLOCKS), "width": WIDTH, "tensors": 100}
    backbone, info = load_backbone_file(run / BACKBONE_FILE, blocks=None, image_size=SIZE)  # as export does
    assert info["format"] == "npz"
    _, model = load_run(run)
    path = export.export_saved_model(
        model,
        tmp_path / "m",
        class_names=[f"c{i}" for i in range(7)],
        seen_classes=model.seen_classes,
        unseen_classes=model.unseen_classes,
        backbone=backbone,
        image_size=SIZE,
        preprocessing="torchvision",
    )
    assert (
        json.loads(open(os.path.join(path, "assets", export.METADATA_FILE)).read())["images"]["preprocessing_kind"]
        == "torchvision"
    )
    loaded = tf.saved_model.load(path)
    data = [open(os.path.join(IMG_DIR, n), "rb").read() for n in IMAGES]
    got = loaded.signatures[export.IMAGES_SIGNATURE](images=tf.constant(data))
    # the reference MSDN (numpy, float64) on torchvision's feature maps, weights read from the checkpoint
    w = {k: np.asarray(v, np.float64) for k, v in read_torch_state_dict(MSDN_PTH).items() if "." not in k}
    fmap = np.stack([tv["map::" + n].reshape(128, -1) for n in IMAGES])  # (B, F, R)
    out = ref.forward(
        fmap,
        w["V"],
        w["W_1"],
        w["W_2"],
        w["W_1_1"],
        w["W_2_1"],
        w["att"],
        bias=float(w["bias"]),
        mask_bias=w["mask_bias"],
    )
    want = 0.9 * out["S1"] + 0.1 * out["S2"]
    scores = got["scores"].numpy()
    for i in range(len(IMAGES)):
        assert rel_l2(scores[i], want[i]) < 2e-2
    np.testing.assert_array_equal(np.argmax(scores, 1), np.argmax(want, 1))


def test_verify_figures_on_tiny_fixtures(tv):
    from msdn_tf.backbones.verify import compare

    rows = compare(TV_PTH, [os.path.join(IMG_DIR, n) for n in IMAGES], tv, image_size=SIZE, blocks=None)
    assert [r["image"] for r in rows] == list(IMAGES)
    for r in rows:
        assert r["extract_rel_l2"] < 1e-5 and r["serving_rel_l2"] < 1e-5
        assert r["decode_pixels_differing"] == 0 and r["serving_input_max_abs_diff"] == 0.0


def test_keras_file_round_trip(tmp_path, tiny_model):
    import keras

    tiny_model.save(tmp_path / "b.keras")
    again = keras.models.load_model(tmp_path / "b.keras")
    x = np.random.default_rng(4).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(tiny_model(x)))
    assert again.get_layer("layer2.1.bn3").epsilon == 1e-5


def test_verify_backbone_report(tmp_path, monkeypatch):
    """The command's checks around :func:`compare` (its figures are tested above): which images, ok, the text."""
    from msdn_tf.backbones import verify
    from msdn_tf.errors import MSDNError

    def fake_compare(weights, paths, reference, image_size, blocks=None):
        err = {"photo.jpg": 1e-4, "wide.png": 2e-3}
        return [
            {
                "image": os.path.basename(p),
                "extract_rel_l2": err[os.path.basename(p)],
                "serving_rel_l2": 1e-2,
                "decode_pixels_differing": 0,
                "serving_input_max_abs_diff": 0.0,
            }
            for p in paths
        ]

    monkeypatch.setattr(verify, "compare", fake_compare)
    reference = tmp_path / "reference.npz"
    np.savez(reference, **{"map::photo.jpg": np.zeros(1), "map::wide.png": np.zeros(1), "other": np.zeros(1)})
    report = verify.verify_backbone(TV_PTH, IMG_DIR, reference)
    assert [r["image"] for r in report["rows"]] == ["photo.jpg", "wide.png"]  # gray.png has no map
    assert report["max_extract_rel_l2"] == 2e-3 and not report["ok"]
    assert verify.verify_backbone(TV_PTH, IMG_DIR, reference, tolerance=1e-2)["ok"]
    text = verify.report_text(report)
    assert text.count("\n") == 4 and "max extract rel L2 2.00e-03 (tolerance 0.001)" in text and "2 images" in text
    np.savez(reference, other=np.zeros(1))
    with pytest.raises(MSDNError, match="has a map in"):
        verify.verify_backbone(TV_PTH, IMG_DIR, reference)
