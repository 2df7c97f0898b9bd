"""Calibrated stacking, the seen-unseen curve and AUSUC, and the evaluate CLI on a tiny trained run."""

import csv
import json
import shutil

import numpy as np
import pytest

from msdn_tf.cli import evaluate
from msdn_tf.evaluation.calibration import ausuc, best_gamma_on_grid, choose_gamma, seen_unseen_curve
from msdn_tf.evaluation.metrics import czsl_predictions, per_class_accuracy, zsl_metrics
from tests.helpers import QUICK_TRAIN, tiny_demo, tiny_demo_config

TINY_DEMO = tiny_demo()


def tiny_config(data_dir, *extra):
    return tiny_demo_config(data_dir, *QUICK_TRAIN, *extra)


# --------------------------------------------------------------------------- curve and AUSUC
def random_problem(rng, n_s=40, n_u=30, C=7, unseen=(2, 5, 6)):
    seen = np.array([c for c in range(C) if c not in unseen])
    unseen = np.array(unseen)
    ys = rng.choice(seen, n_s)
    yu = rng.choice(unseen, n_u)
    ls = rng.normal(size=(n_s, C)) + 1.5 * np.eye(C)[ys]
    lu = rng.normal(size=(n_u, C)) + 1.0 * np.eye(C)[yu]
    return ls, ys, lu, yu, seen, unseen


def test_curve_endpoints_only_seen_then_only_unseen(rng):
    ls, ys, lu, yu, seen, unseen = random_problem(rng)
    curve = seen_unseen_curve(ls, ys, lu, yu, seen, unseen)
    # Gamma is subtracted from seen scores: very negative -> only seen classes predicted.
    assert curve["U"][0] == 0.0
    s_only_seen = per_class_accuracy(ys, seen[np.argmax(ls[:, seen], axis=1)], seen)
    assert curve["S"][0] == pytest.approx(s_only_seen)
    # Very large gamma -> only unseen classes predicted: S = 0 and U = the CZSL accuracy.
    assert curve["S"][-1] == 0.0
    czsl = per_class_accuracy(yu, czsl_predictions(lu, unseen), unseen)
    assert curve["U"][-1] == pytest.approx(czsl) and czsl > 0
    assert np.all(np.diff(curve["S"]) <= 1e-12) and np.all(np.diff(curve["U"]) >= -1e-12)
    assert np.all(np.diff(curve["gamma"]) > 0)


def test_every_curve_point_matches_zsl_metrics(rng):
    ls, ys, lu, yu, seen, unseen = random_problem(rng)
    curve = seen_unseen_curve(ls, ys, lu, yu, seen, unseen)
    for i in np.linspace(0, len(curve["gamma"]) - 1, 12).astype(int):
        m = zsl_metrics(ls, ys, lu, yu, seen, unseen, gamma=curve["gamma"][i])
        assert (m["S"], m["U"], m["H"]) == pytest.approx((curve["S"][i], curve["U"][i], curve["H"][i]))
    best = curve["best"]
    assert best["H"] == pytest.approx(max(curve["H"]))
    assert best["H"] >= zsl_metrics(ls, ys, lu, yu, seen, unseen)["H"]
    assert choose_gamma(ls, ys, lu, yu, seen, unseen) == best
    on_grid = best_gamma_on_grid(ls, ys, lu, yu, seen, unseen, [-1.0, 0.0, best["gamma"]])
    assert on_grid["H"] == pytest.approx(best["H"])


def test_ausuc_of_a_hand_made_case():
    # classes 0, 1 seen; 2, 3 unseen. d = best seen - best unseen per image:
    ls = np.array(
        [
            [2.0, 0, 1, 0],  # label 0: seen argmax right, d = 1
            [0.0, 1, 0, 3],
        ]
    )  # label 1: seen argmax right, d = -2
    lu = np.array(
        [
            [0.0, 0, 1, 0],  # label 2: unseen argmax right, d = -1
            [4.0, 0, 0, 1],
        ]
    )  # label 3: unseen argmax right, d = 3
    curve = seen_unseen_curve(ls, [0, 1], lu, [2, 3], [0, 1], [2, 3])
    # gamma < -2: (S, U) = (1, 0); (-2, -1): (.5, 0); (-1, 1): (.5, .5); (1, 3): (0, .5); > 3: (0, 1)
    assert curve["S"] == [1.0, 0.5, 0.5, 0.0, 0.0]
    assert curve["U"] == [0.0, 0.0, 0.5, 0.5, 1.0]
    # Staircase (0,1)-(0,.5)-(.5,.5)-(.5,0)-(1,0): area = 0.5 * 0.5 by hand.
    assert curve["ausuc"] == pytest.approx(0.25)
    assert curve["best"]["H"] == pytest.approx(0.5) and -1 < curve["best"]["gamma"] < 1
    assert ausuc([0.0, 0.5, 1.0], [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert ausuc([1.0, 0.0], [0.0, 1.0]) == pytest.approx(0.5)  # order of the points does not matter
    with pytest.raises(ValueError):
        ausuc([0.0, 1.0], [1.0])


# --------------------------------------------------------------------------- evaluate CLI
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from msdn_tf.training.loop import run_training

    root = tmp_path_factory.mktemp("evaluate")
    config = tiny_config(root / "data")
    run_training(config, run_dir=root / "run", log=lambda *a: None)
    return root


def test_evaluate_cli_writes_named_reports(tiny_run, capsys):
    run = tiny_run / "run"
    assert evaluate.main(["--run", str(run), "--calibration-curve", "--gamma", "0.5"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "/step" not in printed + captured.err  # quiet: no Keras step lines
    assert "## protocol: final" in printed and "## protocol: reference" in printed
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["protocol"] == "final" and metrics["gamma"] == 0.5
    assert "optimistic" in metrics["reference"]["note"]
    results = json.loads((run / "results.json").read_text())
    assert metrics["gamma_0"]["acc"] == pytest.approx(results["final"]["acc"])  # model.keras = last step
    assert metrics["gamma_0"]["H"] == pytest.approx(results["final"]["H"])
    assert 0.0 <= metrics["calibration_curve"]["ausuc"] <= 1.0
    assert (run / "eval" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(run / "eval" / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == TINY_DEMO.num_classes  # every class has test images in the demo
    names = {int(r["class_id"]): r["class_name"] for r in rows}
    assert all(names[c].endswith(f"class_{c:02d}") for c in names)
    unseen = [r for r in rows if r["split"] == "unseen"]
    assert len(unseen) == TINY_DEMO.num_unseen and all(r["czsl_acc"] != "" for r in unseen)
    assert all(r["class_name"].startswith(r["split"]) for r in rows)  # demo names say seen/unseen
    czsl_mean = np.mean([float(r["czsl_acc"]) for r in unseen])
    assert czsl_mean == pytest.approx(metrics["acc"], abs=1e-5)
    assert rows[0]["class_name"] in (run / "eval" / "report.md").read_text()


def test_evaluate_cli_on_a_converted_like_run_dir(tiny_run, capsys):
    converted = tiny_run / "converted"
    converted.mkdir()
    for name in ("config.yaml", "model.keras"):
        shutil.copy(tiny_run / "run" / name, converted / name)
    assert evaluate.main(["--run", str(converted), "--out", str(tiny_run / "conv_eval")]) == 0
    metrics = json.loads((tiny_run / "conv_eval" / "metrics.json").read_text())
    assert metrics["protocol"] == "as-is" and "reference" not in metrics
    assert "## protocol: as-is" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda root: root / "missing", "run directory not found"),
        (lambda root: root, "no config.yaml"),
    ],
)
def test_evaluate_cli_errors(tmp_path, capsys, make, message):
    assert evaluate.main(["--run", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
