"""Tests for msdn_tf.convert: PyTorch MSDN state_dicts -> msdn-tf run directories.

The fixtures (tests/fixtures/*.pth) were written by real PyTorch with
make_torch_fixtures.py; tiny_msdn_expected.npz holds their exact values. The
logits of every converted model are checked against tests/reference_numpy.py, an
independent float64 NumPy forward pass of the reference, run on those values.
"""

import collections
import hashlib
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import scipy.io

from msdn_tf.cli.convert import main
from msdn_tf.errors import DataError, MSDNError
from msdn_tf.training.convert import convert_checkpoint, convert_state_dict
from tests import reference_numpy as ref
from tests.helpers import shared_zsl_dir
from tests.helpers import torch_fixture as fixture

K, D, F, C = 5, 4, 6, 7
SEEN, UNSEEN = [0, 1, 2, 4, 5], [3, 6]
WEIGHT_KEYS = ("V", "att", "W_1", "W_2", "W_1_1", "W_2_1")


@pytest.fixture(scope="module")
def fmap():
    """Channel-first region features (B, F, R), like the reference's input."""
    return np.random.default_rng(7).random((3, F, 9)) + 0.05


def weights_of(expected, stem):
    return {k: expected["%s::%s" % (stem, k)] for k in WEIGHT_KEYS + ("bias", "mask_bias")}


def reference_logits(w, fmap_bfr, fusion=(0.9, 0.1), bias=None, normalize_V=False):
    args = {k: np.asarray(w[k], np.float64) for k in WEIGHT_KEYS}
    out = ref.forward(
        fmap_bfr,
        args["V"],
        args["W_1"],
        args["W_2"],
        args["W_1_1"],
        args["W_2_1"],
        args["att"],
        bias=float(w["bias"] if bias is None else bias),
        mask_bias=np.asarray(w["mask_bias"], np.float64),
        normalize_V=normalize_V,
    )
    return {"logits_a2v": out["S1"], "logits_v2a": out["S2"], "logits": fusion[0] * out["S1"] + fusion[1] * out["S2"]}


def keras_logits(model, fmap_bfr):
    out = model(np.transpose(fmap_bfr, (0, 2, 1)).astype(np.float32))
    return {k: np.asarray(out[k], np.float64) for k in ("logits_a2v", "logits_v2a", "logits")}


def assert_logits_equal(got, want):
    for key in ("logits_a2v", "logits_v2a", "logits"):
        scale = np.max(np.abs(want[key]))
        assert scale > 0.1, key  # non-trivial values, so the comparison means something
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5 * scale, err_msg=key)


def load_run(run_dir):
    from msdn_tf.evaluation.runs import load_run as _load_run

    return _load_run(run_dir)


# --------------------------------------------------------------------------- conversions


def test_tiny_checkpoint_round_trips_and_matches_reference(tmp_path, expected, fmap, capsys):
    out = tmp_path / "run"
    assert main(["--torch-checkpoint", fixture("tiny_msdn"), "--dataset", "custom", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "K=5 attributes, D=4, F=6, C=7 classes (5 seen, 2 unseen" in printed
    assert "report: %s" % (out / "conversion.json") in printed

    report = json.loads((out / "conversion.json").read_text())
    assert sorted(os.listdir(out)) == ["config.yaml", "conversion.json", "model.keras"]
    data = open(fixture("tiny_msdn"), "rb").read()
    assert report["source"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert report["source"]["path"] == os.path.abspath(fixture("tiny_msdn"))
    assert report["sizes"] == {"K": K, "D": D, "F": F, "C": C}
    # "custom" is the table entry for a user's own data (msdn_tf.data.custom): no fixed sizes to check.
    assert report["dataset"] == "custom" and report["dataset_in_table"] is True
    assert {k: v["shape"] for k, v in report["mapped_keys"].items()} == {
        "V": [K, D],
        "att": [C, K],
        "W_1": [D, F],
        "W_2": [D, F],
        "W_1_1": [F, D],
        "W_2_1": [D, F],
        "bias": [],
        "mask_bias": [1, C],
    }
    assert report["mapped_keys"]["W_1_1"]["keras_weight"].endswith("W_1_1")
    assert set(report["ignored_keys"]) == {"weight_ce", "W_3", "W_3_1"}
    assert "dead code" in report["ignored_keys"]["W_3"]
    assert report["backbone"]["count"] == 0 and report["backbone"]["loaded"] is False
    assert report["bias"] == 0.0
    assert report["mask_bias"]["seen_classes"] == SEEN
    assert report["mask_bias"]["unseen_classes"] == UNSEEN
    assert report["warnings"] == [] and report["cast_to_float32"] == {}
    assert report["metadata"]["data_dir"] is None

    config, model = load_run(out)
    assert config.data.dataset == "custom"
    assert list(config.model.fusion_weights) == [0.9, 0.1] and config.model.bias == 0.0
    assert model.seen_classes == SEEN and model.unseen_classes == UNSEEN
    w = weights_of(expected, "tiny_msdn")
    for key in WEIGHT_KEYS:
        np.testing.assert_array_equal(
            np.asarray(
                getattr(
                    {
                        "V": model.embedding,
                        "att": model.embedding,
                        "W_1": model.a2v,
                        "W_2": model.a2v,
                        "W_1_1": model.v2a,
                        "W_2_1": model.v2a,
                    }[key],
                    key,
                )
            ),
            w[key],
            err_msg=key,
        )
    np.testing.assert_array_equal(np.asarray(model.mask_bias), w["mask_bias"])
    assert_logits_equal(keras_logits(model, fmap), reference_logits(w, fmap))


def test_backbone_tensors_are_reported_not_loaded(tmp_path, expected, fmap):
    report = convert_checkpoint(fixture("tiny_msdn_backbone"), "custom", tmp_path / "run")
    keys = [k for k in expected["tiny_msdn_backbone::__keys__"] if k.startswith("backbone.")]
    assert report["backbone"]["count"] == len(keys) == 5
    assert report["backbone"]["prefixes"] == {"backbone.": 5}
    assert report["backbone"]["total_parameters"] == sum(expected["tiny_msdn_backbone::" + k].size for k in keys)
    assert report["backbone"]["loaded"] is False
    _, model = load_run(tmp_path / "run")
    assert len(model.weights) == 8  # the MSDN weights only
    assert_logits_equal(keras_logits(model, fmap), reference_logits(weights_of(expected, "tiny_msdn_backbone"), fmap))


def test_half_precision_checkpoint_is_cast(tmp_path, expected, fmap):
    report = convert_checkpoint(fixture("tiny_msdn_fp16"), "custom", tmp_path / "run")
    assert report["cast_to_float32"] == {"V": "float16 -> float32"}
    assert report["mapped_keys"]["V"]["dtype"] == "float16"
    assert report["backbone"]["count"] == 5
    _, model = load_run(tmp_path / "run")
    assert all(v.dtype == "float32" for v in model.weights)
    assert_logits_equal(keras_logits(model, fmap), reference_logits(weights_of(expected, "tiny_msdn_fp16"), fmap))


def test_bias_dtypes_and_config_overrides_are_honoured(tmp_path, expected, fmap):
    w = weights_of(expected, "tiny_msdn")
    state = collections.OrderedDict((k, w[k].astype(np.float64)) for k in WEIGHT_KEYS)
    state["bias"] = np.array(2, dtype=np.int64)  # some files hold an integer bias
    state["mask_bias"] = w["mask_bias"].astype(np.float64)
    state["weight_ce"] = np.eye(C)
    report = convert_state_dict(
        state,
        "custom",
        tmp_path / "run",
        source={"path": "in-memory"},
        overrides=["model.fusion_weights=[1.0, 0.0]", "model.normalize_attribute_vectors=true", "model.bias=5"],
    )
    assert report["bias"] == 2.0
    assert report["warnings"] == ["--set model.bias=5 ignored: the checkpoint's bias 2 is used"]
    assert report["cast_to_float32"]["bias"] == "int64 -> float32"
    assert report["cast_to_float32"]["V"] == "float64 -> float32"
    config, model = load_run(tmp_path / "run")
    assert config.model.bias == 2.0 and float(np.asarray(model.bias)) == 2.0
    assert list(config.model.fusion_weights) == [1.0, 0.0]
    assert model.normalize_attribute_vectors
    want = reference_logits(w, fmap, fusion=(1.0, 0.0), bias=2.0, normalize_V=True)
    assert_logits_equal(keras_logits(model, fmap), want)


# --------------------------------------------------------------------------- metadata


def write_xlsa17(
    folder, att_kc, labels, trainval, test_seen, test_unseen, names=None, attribute_names=None, image_list=True
):
    """A tiny att_splits.mat (+ image_list.npz, attributes.txt) with 0-based locs given."""
    os.makedirs(folder, exist_ok=True)
    n_cls = att_kc.shape[1]
    names = names or ["%03d.class_%d" % (i + 1, i) for i in range(n_cls)]
    cell = np.empty((n_cls, 1), dtype=object)
    for i, name in enumerate(names):
        cell[i, 0] = np.array([name])
    scipy.io.savemat(
        os.path.join(folder, "att_splits.mat"),
        {
            "att": att_kc,
            "original_att": att_kc * 100,
            "allclasses_names": cell,
            "trainval_loc": (np.asarray(trainval) + 1).reshape(-1, 1),
            "test_seen_loc": (np.asarray(test_seen) + 1).reshape(-1, 1),
            "test_unseen_loc": (np.asarray(test_unseen) + 1).reshape(-1, 1),
        },
    )
    if image_list:
        np.savez(
            os.path.join(folder, "image_list.npz"),
            labels=np.asarray(labels, np.int64),
            image_files=np.array(["img_%03d.jpg" % i for i in range(len(labels))]),
        )
    if attribute_names is not None:
        with open(os.path.join(folder, "attributes.txt"), "w") as fh:
            fh.writelines("%d %s\n" % (i + 1, a) for i, a in enumerate(attribute_names))
    return str(folder)


def tiny_metadata(folder, expected, unseen=UNSEEN, att_noise=0.0, k=K, image_list=True):
    att = expected["tiny_msdn::att"].astype(np.float64).T.copy()  # (K, C), columns unit norm
    if k != K:
        att = np.vstack([att, np.ones((k - K, C))])
    att[0, 0] += att_noise
    labels = np.repeat(np.arange(C), 3)
    rows = np.arange(labels.size)
    is_unseen = np.isin(labels, unseen)
    trainval = rows[~is_unseen & (rows % 3 != 2)]
    test_seen = rows[~is_unseen & (rows % 3 == 2)]
    test_unseen = rows[is_unseen]
    return write_xlsa17(
        folder,
        att,
        labels,
        trainval,
        test_seen,
        test_unseen,
        attribute_names=["has_part::%d" % i for i in range(k)],
        image_list=image_list,
    )


def test_metadata_from_att_splits(tmp_path, expected):
    data_dir = tiny_metadata(tmp_path / "meta", expected)
    out = tmp_path / "run"
    report = convert_checkpoint(fixture("tiny_msdn"), "custom", out, data_dir=data_dir)
    assert report["warnings"] == []
    meta = report["metadata"]
    assert meta["seen_unseen_match"] is True and meta["att_max_abs_diff"] < 1e-6
    assert meta["att_splits"] == os.path.join(data_dir, "att_splits.mat")
    names = json.loads((out / "metadata.json").read_text())
    assert names["class_names"] == ["%03d.class_%d" % (i + 1, i) for i in range(C)]
    assert names["attribute_names"] == ["has_part::%d" % i for i in range(K)]
    assert names["seen_classes"] == SEEN and names["unseen_classes"] == UNSEEN
    assert "metadata.json" in report["files"]
    config, _ = load_run(out)
    assert config.data.data_dir == data_dir


def test_metadata_att_difference_is_a_warning(tmp_path, expected):
    data_dir = tiny_metadata(tmp_path / "meta", expected, att_noise=0.05)
    report = convert_checkpoint(fixture("tiny_msdn"), "custom", tmp_path / "run", data_dir=data_dir)
    assert report["metadata"]["att_max_abs_diff"] > 1e-4
    assert len(report["warnings"]) == 1 and "'att' differs" in report["warnings"][0]
    assert (tmp_path / "run" / "model.keras").is_file()


def test_metadata_without_image_list_warns(tmp_path, expected):
    data_dir = tiny_metadata(tmp_path / "meta", expected, image_list=False)
    report = convert_checkpoint(fixture("tiny_msdn"), "custom", tmp_path / "run", data_dir=data_dir)
    assert report["metadata"]["seen_unseen_match"] is None
    assert any("were not checked" in w for w in report["warnings"])


def test_metadata_mismatches_are_refused(tmp_path, expected, capsys):
    data_dir = tiny_metadata(tmp_path / "swapped", expected, unseen=(3, 5))
    with pytest.raises(
        DataError,
        match=r"the seen classes of 'mask_bias' \(5\) differ from those of "
        r".*att_splits.mat \(labels of 'trainval_loc', 5\): only in the "
        r"checkpoint: \[5 \(006.class_5\)\]; only in the metadata: "
        r"\[6 \(007.class_6\)\]",
    ):
        convert_checkpoint(fixture("tiny_msdn"), "custom", tmp_path / "run", data_dir=data_dir)
    data_dir = tiny_metadata(tmp_path / "k6", expected, k=K + 1)
    argv = [
        "--torch-checkpoint",
        fixture("tiny_msdn"),
        "--dataset",
        "custom",
        "--out",
        str(tmp_path / "run"),
        "--data-dir",
        data_dir,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'V' has shape (5, 4), expected (6, D) (6 attributes in" in err and "att_splits.mat" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dataset, fusion, normalize", [("cub", [0.9, 0.1], False), ("awa2", [1.0, 0.0], True)])
def test_benchmark_shaped_checkpoint_with_real_metadata(tmp_path, dataset, fusion, normalize):
    from msdn_tf.data.base import class_attributes_for_model
    from msdn_tf.data.registry import DATASETS
    from msdn_tf.data.xlsa17 import load_att_splits, load_images

    folder = shared_zsl_dir() / DATASETS[dataset].upstream_name
    splits = load_att_splits(str(folder / "att_splits.mat"))
    labels = load_images(str(folder / "image_list.npz"))["labels"]
    unseen = np.unique(labels[splits["test_unseen_loc"]])
    n_cls, k = splits["att"].shape
    rng = np.random.default_rng(0)
    mask = -np.ones((1, n_cls), np.float32)
    mask[0, unseen] = 1.0
    d, f = 3, 5  # D and F come from the checkpoint; K and C must be the dataset's
    state = {
        "V": rng.normal(size=(k, d)),
        "W_1": rng.normal(size=(d, f)),
        "W_2": rng.normal(size=(d, f)),
        "W_1_1": rng.normal(size=(f, d)),
        "W_2_1": rng.normal(size=(d, f)),
        "W_3": np.zeros((d, f)),
        "W_3_1": np.zeros((f, d)),
        "att": class_attributes_for_model(splits["att"], nonnegative=(dataset == "awa2")),
        "bias": np.float64(0.0),
        "mask_bias": mask,
        "weight_ce": np.eye(n_cls),
    }
    name = "%s_MSDN_CZSL.pth" % DATASETS[dataset].upstream_name
    report = convert_state_dict(
        state, dataset, tmp_path / "run", data_dir=str(folder), source={"path": name, "file_name": name}
    )
    assert report["released_checkpoint"] == {"dataset": dataset, "variant": "CZSL"}
    assert report["warnings"] == [] and report["metadata"]["seen_unseen_match"] is True
    assert report["mask_bias"]["num_unseen"] == DATASETS[dataset].expected["unseen_classes"]
    assert report["config"] == {"fusion_weights": fusion, "normalize_attribute_vectors": normalize, "overrides": []}
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert len(meta["class_names"]) == n_cls and len(meta["attribute_names"]) == k
    # Another dataset's checkpoint is refused by its sizes.
    other = "sun" if dataset == "cub" else "cub"
    with pytest.raises(
        DataError, match=r"'V' has shape \(%d, 3\), expected \(%d, D\)" % (k, DATASETS[other].expected["attributes"])
    ):
        convert_state_dict(state, other, tmp_path / "other")


# --------------------------------------------------------------------------- refusals


def test_benchmark_sizes_are_checked_without_metadata(tmp_path, capsys):
    argv = ["--torch-checkpoint", fixture("tiny_msdn"), "--dataset", "cub", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tiny_msdn.pth: 'V' has shape (5, 4), expected (312, D)" in err
    assert not (tmp_path / "r").exists()


def test_wrong_shape_checkpoint(tmp_path, capsys):
    with pytest.raises(DataError, match=r"'W_1_1' has shape \(4, 6\), expected \(6, 4\)"):
        convert_checkpoint(fixture("tiny_msdn_wrong_shape"), "custom", tmp_path / "run")
    assert (
        main(
            [
                "--torch-checkpoint",
                fixture("tiny_msdn_wrong_shape"),
                "--dataset",
                "custom",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert "tiny_msdn_wrong_shape.pth: 'W_1_1' has shape (4, 6)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_truncated_checkpoint(tmp_path, capsys):
    data = open(fixture("tiny_msdn"), "rb").read()
    path = tmp_path / "CUB_MSDN_GZSL.pth"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match="truncated or corrupt"):
        convert_checkpoint(path, "custom", tmp_path / "run")
    assert main(["--torch-checkpoint", str(path), "--dataset", "cub", "--out", str(tmp_path / "run")]) == 2
    assert "error: %s is a truncated or corrupt zip" % path in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


class _SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned.txt"
    payload = pickle.dumps(collections.OrderedDict(V=_SystemCall("echo pwned > %s" % marker)), protocol=2)
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", payload)
        zf.writestr("evil/byteorder", "little")
        zf.writestr("evil/version", "3\n")
    with pytest.raises(DataError, match="refusing to load .*nothing was executed"):
        convert_checkpoint(path, "custom", tmp_path / "run")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "msdn_tf.convert",
            "--torch-checkpoint",
            str(path),
            "--dataset",
            "custom",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "error: refusing to load %s: it references '%s.system'" % (path, os.system.__module__) in run.stderr
    assert "Traceback" not in run.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_invalid_values_are_refused(tmp_path, expected):
    w = weights_of(expected, "tiny_msdn")
    base = dict(w)
    cases = [
        (dict(base, mask_bias=np.where(w["mask_bias"] > 0, 1.0, 0.0)), r"'mask_bias' must hold \+1"),
        (dict(base, mask_bias=-np.ones((1, C))), "marks no class as unseen"),
        (dict(base, W_2=np.where(np.arange(F) == 2, np.nan, w["W_2"])), "'W_2' holds 4 NaN"),
    ]
    for state, message in cases:
        with pytest.raises(DataError, match=message):
            convert_state_dict(state, "custom", tmp_path / "run")
    with pytest.raises(
        DataError, match="'mask_bias' marks 715 seen and 2 unseen classes but sun has 645 seen and 72 unseen"
    ):
        convert_state_dict(
            dict(
                base,
                V=np.zeros((102, D)),
                att=np.zeros((717, 102)),
                mask_bias=np.where(np.arange(717) < 2, 1.0, -1.0)[None],
            ),
            "sun",
            tmp_path / "run",
        )
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_needs_overwrite(tmp_path, expected):
    out = tmp_path / "run"
    convert_checkpoint(fixture("tiny_msdn"), "custom", out)
    with pytest.raises(MSDNError, match="already holds a run .*--overwrite"):
        convert_checkpoint(fixture("tiny_msdn"), "custom", out)
    report = convert_checkpoint(fixture("tiny_msdn_backbone"), "custom", out, overwrite=True)
    assert json.loads((out / "conversion.json").read_text())["backbone"]["count"] == 5
    assert report["source"]["file_name"] == "tiny_msdn_backbone.pth"


# --------------------------------------------------------------------------- export


def test_converted_model_exports_with_the_same_scores(tmp_path, fmap):
    try:
        import msdn_tf.serving.export as export
    except ImportError as exc:
        pytest.skip(
            "msdn_tf.serving.export is not available (%s); the export check of converted "
            "checkpoints runs once it is" % exc
        )
    import tensorflow as tf

    out = tmp_path / "run"
    convert_checkpoint(fixture("tiny_msdn"), "custom", out)
    config, model = load_run(out)
    version_dir = export.export_saved_model(
        model,
        str(tmp_path / "export"),
        version=1,
        class_names=["class_%d" % i for i in range(C)],
        seen_classes=SEEN,
        unseen_classes=UNSEEN,
        gamma=0.0,
        top_k=3,
        config=config,
    )
    features = np.transpose(fmap, (0, 2, 1)).astype(np.float32)  # (B, R, F)
    want = np.asarray(model(features)["logits"])

    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    outputs = {k: np.asarray(v) for k, v in signature(features=tf.constant(features)).items()}
    np.testing.assert_allclose(outputs["scores"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outputs["czsl_class"], np.asarray(UNSEEN)[want[:, UNSEEN].argmax(1)])
