"""The benchmark command: valid JSON with the expected keys at tiny shapes, and the FLOP count.

Speed itself is measured by ``python -m msdn_tf.bench``, never asserted here.
"""

import json

import numpy as np
import pytest

from msdn_tf.cli import bench
from msdn_tf.perf import model_speed
from tests.helpers import BENCH_TINY_ARGS

TINY = BENCH_TINY_ARGS


def test_flop_formula_against_a_hand_count():
    R, F, K = 196, 2048, 312
    # Hand count: each of the four contractions maps R regions x F channels to R x K
    # outputs, every output a sum of F products (F multiply-adds = 2F FLOP).
    contractions = {
        "S (V W_1)": (R, F, K),
        "A logits (V W_2)": (R, F, K),
        "T (W_1_1 V^T)": (R, F, K),
        "Bw logits (V W_2_1)": (R, F, K),
    }
    hand = sum(2 * r * k * f for r, f, k in contractions.values())
    assert model_speed.forward_flops_per_image(R, F, K) == hand == 1_001_914_368  # ~1.0 GFLOP (docs/reference.md §10)
    # Training adds the weight gradient dP = dY^T Fs of each contraction (same size); no input gradient.
    assert model_speed.train_flops_per_image(R, F, K) == 2 * hand == 2_003_828_736  # ~2.0 GFLOP (docs/reference.md §10)
    assert model_speed.forward_flops_per_image(49, F, K) * 4 == hand
    assert model_speed.projection_flops_per_step(F, K, 300, training=False) == 4 * 2 * K * 300 * F


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--variants", "einsum:nojit", "fused:jit:mixed_bfloat16"]])
def test_bench_prints_valid_json(tmp_path, capsys, extra):
    out = tmp_path / "bench.json"
    assert bench.main(TINY + ["--json", str(out)] + extra) == 0
    table = capsys.readouterr().out  # the short human summary; the JSON went to the file
    printed = json.loads(out.read_text())
    lines = table.splitlines()
    assert lines[0].startswith("matmul limit:") and len(lines) == 2 + 2 * len(printed["config"]["variants"]) + 1
    for name in printed["config"]["variants"]:
        assert f"   9  {name}" in table and f"   4  {name}" in table
    for key in ("config", "machine", "flop_formula", "matmul_square", "shapes", "reference"):
        assert key in printed
    assert printed["machine"]["load_before"] is None or len(printed["machine"]["load_before"]) == 3
    assert [s["regions"] for s in printed["shapes"]] == [9, 4]
    names = printed["config"]["variants"]
    assert len(names) == (2 if extra else 1)
    for shape in printed["shapes"]:
        assert set(shape["matmul"]) == {"forward", "weight_gradient", "forward_eval"}
        assert shape["matmul"]["forward"]["shape"] == [4 * shape["regions"], 16, 32]
        assert set(shape["variants"]) == set(names)
        for entry in shape["variants"].values():
            for mode, batch in (("train", 4), ("eval", 6)):
                m = entry[mode]
                assert m["batch"] == batch
                assert m["step_s_min"] <= m["step_s_median"]
                assert len(m["step_s_all"]) == 2
                assert m["images_per_s_median"] == pytest.approx(batch / m["step_s_median"])
                assert m["fraction_of_limit_median"] > 0 and np.isfinite(m["fraction_of_limit_median"])
                assert m["fraction_best_vs_best_limit"] > 0
            R = shape["regions"]
            assert entry["train"]["essential_gflop_per_image"] == pytest.approx(16 * R * 16 * 8 / 1e9)
            assert entry["eval"]["essential_gflop_per_image"] == pytest.approx(8 * R * 16 * 8 / 1e9)


def test_all_matrix_flops_count_the_projections_and_logits():
    B, R, F, K, D, C = 50, 49, 2048, 312, 300, 200
    projections = 4 * 2 * K * D * F  # V W_1, V W_2, W_1_1 V^T, V W_2_1
    logits = 2 * 2 * B * K * C  # scores @ att^T, both sub-nets
    assert (
        model_speed.all_matrix_flops_per_step(B, R, F, K, D, C, training=False)
        == B * model_speed.forward_flops_per_image(R, F, K) + projections + logits
    )
    # training: + weight gradients of the contractions, dW and dV of each projection, dscores of the logits
    assert (
        model_speed.all_matrix_flops_per_step(B, R, F, K, D, C, training=True)
        == B * model_speed.train_flops_per_image(R, F, K) + 3 * projections + 2 * logits
    )


def test_auto_variant_reports_the_chosen_precision(capsys):
    from msdn_tf.precision import resolve_precision

    assert bench.main(TINY[:2] + TINY[4:] + ["--variants", "fused:nojit", "fused:nojit:auto", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # --json alone: the JSON report on stdout
    chosen = resolve_precision("auto").policy
    assert report["config"]["precision_used"] == {"fused:nojit:float32": "float32", "fused:nojit:auto": chosen}
    entry = report["shapes"][0]["variants"]["fused:nojit:auto"]
    assert entry["precision"]["requested"] == "auto" and entry["precision"]["used"] == chosen
    assert entry["precision"]["reason"].startswith("auto:")
    assert set(entry["vs_float32"]) == {"train", "eval"} and entry["vs_float32"]["train"] > 0
    assert "vs_float32" not in report["shapes"][0]["variants"]["fused:nojit:float32"]
    assert entry["train"]["fraction_all_matrix_median"] > 0


def test_variant_parsing():
    assert model_speed.parse_variant("fused") == {
        "name": "fused:jit:float32",
        "impl": "fused",
        "jit": True,
        "precision": "float32",
        "check": True,
    }
    assert model_speed.parse_variant("fused:nojit:float32:nocheck")["check"] is False
    assert model_speed.parse_variant("einsum:nojit:mixed_float16")["jit"] is False
    with pytest.raises(ValueError, match="variant"):
        model_speed.parse_variant("fused:maybe")


@pytest.mark.parametrize("shape", ["cub", "awa2"])
def test_input_benchmark_synthetic_data_has_the_benchmark_structure(tmp_path, shape):
    """The cache that bench_input generates reads back row by row, and its splits are those of a
    zero-shot benchmark (made by the demo's split rule)."""
    from msdn_tf.data.datasets import BENCHMARKS
    from msdn_tf.perf.input_pipeline import check_read_back, generate, synthetic_data

    facts, n = BENCHMARKS[shape], 600
    path = generate(str(tmp_path / "bench.regions_float16.npy"), n, 3, 4, progress=False)
    data = synthetic_data(path, shape, n)
    rows = data.features.read(np.array([n - 1, 3]))
    np.testing.assert_allclose(rows[:, 0, 0], [(n - 1) / n, 3 / n], atol=1e-3)
    assert set(np.unique(data.labels)) == set(range(facts.classes))
    seen = data.labels < facts.seen_classes
    tv, ts, tu = data.trainval_loc, data.test_seen_loc, data.test_unseen_loc
    assert seen[tv].all() and seen[ts].all() and not seen[tu].any()
    assert np.intersect1d(tv, ts).size == 0 and sorted(np.concatenate([tv, ts, tu])) == list(range(n))
    assert set(data.labels[ts]) <= set(data.labels[tv])
    assert data.att.shape == (facts.classes, facts.attributes)
    check_read_back(data, n, path)  # as generated: passes


def test_input_benchmark_refuses_a_cache_that_reads_back_wrong(tmp_path):
    from msdn_tf.errors import MSDNError
    from msdn_tf.perf.input_pipeline import check_read_back, generate, synthetic_data

    n = 600
    path = generate(str(tmp_path / "bench.regions_float16.npy"), n, 3, 4, progress=False)
    rows = np.load(path, mmap_mode="r+")
    rows[3, 0, 0] = 0.5  # another run's (or a damaged) cache
    rows.flush()
    del rows
    with pytest.raises(MSDNError, match=r"bench\.regions_float16\.npy: rows 599 and 3 read back as .*delete it"):
        check_read_back(synthetic_data(path, "cub", n), n, path)


@pytest.mark.slow
def test_compare_backends_times_both_in_one_run(capsys):
    # Two worker processes (TensorFlow, JAX), timed in turn every repeat; the ratio per repeat.
    import importlib.util

    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed: pip install -e '.[jax]'")
    from msdn_tf.perf.backend_compare import report_text

    argv = TINY[:1] + ["4"] + TINY[3:] + ["--compare-backends", "tensorflow", "jax", "--loop-steps", "2"]
    assert bench.main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    shape = report["shapes"][0]
    assert set(shape["backends"]) == {"tensorflow", "jax"} and shape["regions"] == 4
    assert shape["backends"]["jax"]["steps_per_dispatch"] == 2
    assert shape["backends"]["jax"]["machine"]["backend"] == "jax"
    assert len(shape["ratio"]["all"]["train"]) == 2 and shape["ratio"]["train"] > 0
    assert report["load_before"] is not None and report["config"]["backends"] == ["tensorflow", "jax"]
    # What the command prints without --json: a row per backend, then the ratio with its range.
    table = report_text(report).splitlines()
    assert [line.split()[1] for line in table[2:4]] == ["tensorflow", "jax"]
    assert table[4].split()[1:3] == ["jax", "images/s"] and f"train {shape['ratio']['train']:.2f}x" in table[4]


def test_compare_backends_refuses_unknown_backends(capsys):
    assert bench.main(TINY + ["--compare-backends", "tensorflow", "torch"]) == 2
    assert "--compare-backends" in capsys.readouterr().err


def test_pipe_worker_reports_a_dead_silent_or_chatty_worker(tmp_path):
    """The benchmarks' worker processes (other backend, torchvision): every way a worker goes wrong is one line."""
    import sys

    from msdn_tf.errors import MSDNError
    from msdn_tf.perf.pipe_worker import PipeWorker

    dies = PipeWorker([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], "w1")
    with pytest.raises(MSDNError, match=r"^w1: exited with code 3 while starting: boom$"):
        dies.receive(30, "starting")
    silent = PipeWorker([sys.executable, "-c", "import time; time.sleep(60)"], "w2", hint=" (see why)")
    with pytest.raises(MSDNError, match=r"^w2: took over 1 s starting \(see why\)$"):
        silent.receive(1, "starting")
    assert silent.proc.poll() is not None  # stopped, not left running
    # 1 MB on stderr before the answer: a stderr pipe nobody reads would block the worker here.
    code = "import sys; sys.stderr.write('x' * 2**20 + '\\nlast\\n'); print('{}')"
    chatty = PipeWorker([sys.executable, "-c", code], "w3")
    assert chatty.receive_json(30) == {} and chatty.last_stderr_line() == "last"
    chatty.close()
    garbled = PipeWorker([sys.executable, "-c", "print('not json')"], "w4")
    with pytest.raises(MSDNError, match=r"^w4: answered 'not json' while running, not a JSON line$"):
        garbled.receive_json(30)
    with pytest.raises(MSDNError, match="not an executable file"):
        PipeWorker([str(tmp_path / "missing")], "w5")
