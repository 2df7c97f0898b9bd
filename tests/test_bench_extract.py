"""The extraction benchmark command: valid JSON with the expected keys on a tiny trunk.

Speed itself is measured by ``python -m msdn_tf.bench_extract``, never asserted here.
"""

import json

import pytest

from msdn_tf.cli import bench_extract

pytestmark = pytest.mark.slow  # three trunks traced and timed, about 30 s on 2 busy cores

TINY = ["--image-size", "64", "--batch", "1", "--blocks", "1", "1", "1", "1", "--width", "4"]


def test_bench_extract_reports_speed_flops_and_feature_error(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = TINY + ["--repeats", "1", "--warmup", "0", "--variants", "before", "float32", "mixed_bfloat16"]
    assert bench_extract.main(argv + ["--json", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()  # the short table; the report is in the file
    report = json.loads(out.read_text())
    rows = {line.split()[0]: line.split() for line in table[2:5]}
    assert set(rows) == {"before", "float32", "mixed_bfloat16"}
    assert rows["float32"][2] == f"{report['variants']['float32']['images_per_s_median']:.2f}"
    assert any(line.strip().startswith("net float32 / before") for line in table)
    assert report["conv_gflop_per_image"] > 0 and report["machine"]["load_before"] is not None
    variants = report["variants"]
    assert variants["before"]["feature_rel_l2_vs_before"] == 0.0
    assert variants["float32"]["feature_rel_l2_vs_before"] < 1e-5  # BatchNorm folding: rounding only
    assert 0 < variants["mixed_bfloat16"]["feature_rel_l2_vs_before"] < 5e-2
    for entry in variants.values():
        assert entry["images_per_s_median"] > 0 and entry["fraction_of_conv_rate_median"] > 0
    assert set(report["end_to_end"]) == {"before", "float32"}
    assert "net float32 / before" in report["speedups"] and "preprocess now / before" in report["speedups"]
    assert (
        report["conv_rate"]["float32_gflop_per_s_median"] > 0 and "bfloat16_gflop_per_s_median" in report["conv_rate"]
    )


def test_json_without_a_file_prints_the_report(capsys):
    argv = TINY + ["--repeats", "1", "--warmup", "0", "--variants", "float32", "--json"]
    assert bench_extract.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["variants"]) == {"float32"} and "torchvision" not in report


def test_unknown_variant_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench_extract.main(TINY + ["--variants", "fp8"])
    assert "invalid choice" in capsys.readouterr().err


def test_torchvision_state_is_the_inverse_of_loading_it():
    import numpy as np

    from msdn_tf.backbones.torchvision_resnet import (
        build_torchvision_resnet,
        expected_state_shapes,
        load_torchvision_weights,
        torchvision_state,
    )
    from msdn_tf.perf.extraction_speed import random_trunk

    trunk = random_trunk((1, 2, 1, 1), 4, 32, seed=3)
    state = torchvision_state(trunk)
    assert {k: v.shape for k, v in state.items()} == expected_state_shapes((1, 2, 1, 1), 4)
    fresh = build_torchvision_resnet((1, 2, 1, 1), 4, image_size=32)
    load_torchvision_weights(fresh, state)
    for a, b in zip(trunk.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(trunk.predict_on_batch(x), fresh.predict_on_batch(x))


def test_torch_python_that_is_not_an_interpreter_is_refused_before_any_work(tmp_path, capsys):
    missing = tmp_path / "no-such-python"
    assert bench_extract.main(TINY + ["--torch-python", str(missing)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --torch-python {missing}: not an executable file"


def test_torch_python_without_torch_is_one_clear_line(capsys):
    import sys

    try:
        import torch  # noqa: F401

        pytest.skip("this interpreter has torch: the error path needs one without it")
    except ImportError:
        pass
    assert bench_extract.main(TINY + ["--repeats", "1", "--variants", "float32", "--torch-python", sys.executable]) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: --torch-python {sys.executable}: ") and "cannot import torch" in last


def test_torchvision_in_the_same_run_matches_our_features_and_preprocessing(tmp_path, capsys):
    """Runs torchvision for real: needs MSDN_TORCH_PYTHON, an interpreter with torch and torchvision."""
    import os

    python = os.environ.get("MSDN_TORCH_PYTHON")
    if not python:
        pytest.skip("set MSDN_TORCH_PYTHON to an interpreter with torch + torchvision (a separate venv) to run this")
    out = tmp_path / "b.json"
    argv = ["--image-size", "64", "--batch", "2", "--blocks", "1", "1", "1", "1", "--width", "64"]
    argv += ["--repeats", "1", "--warmup", "1", "--variants", "before", "float32", "--torch-python", python]
    assert bench_extract.main(argv + ["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    tv = report["torchvision"]
    assert tv["torch"] and tv["threads"] >= 1
    for key in ("net", "net_channels_last", "end_to_end"):
        assert tv[key]["images_per_s_median"] > 0
    # The same weights and batch through torchvision and through our trunk (folded or not).
    assert max(tv["feature_rel_l2_ours_vs_torchvision"].values()) < 1e-5
    assert tv["preprocessed_vs_torchvision"]["max_abs"] < 1e-6
    for key in (
        "net float32 / torchvision",
        "net float32 / torchvision channels_last",
        "end_to_end float32 / torchvision",
    ):
        assert report["speedups"][key] > 0
