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
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
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


def test_unknown_variant_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench_extract.main(TINY + ["--variants", "fp8"])
    assert "invalid choice" in capsys.readouterr().err
