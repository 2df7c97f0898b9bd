"""Zero-shot after deployment (msdn_tf.zeroshot): classes added without retraining, serving_open, evidence.

One tiny demo run (quick schedule) is trained once per module; the usefulness experiment
(msdn_tf.held_out: two more trainings) is the one slow test.
"""

from __future__ import annotations

import hashlib
import json
import os

import h5py
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from msdn_tf import zeroshot  # noqa: E402
from msdn_tf.cli import evaluate, export  # noqa: E402
from msdn_tf.errors import DataError, MSDNError  # noqa: E402
from msdn_tf.serving import classify  # noqa: E402
from msdn_tf.serving import export as serving_export  # noqa: E402
from tests.helpers import QUICK_TRAIN, tiny_demo_config  # noqa: E402


def _logits(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)["logits"]), np.float64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from msdn_tf.data.registry import load_dataset
    from msdn_tf.evaluation.runs import load_run
    from msdn_tf.training.loop import run_training

    root = tmp_path_factory.mktemp("zeroshot")
    config = tiny_demo_config(root / "data" / "demo", *QUICK_TRAIN)
    run_training(config, root / "run", log=lambda *a, **k: None)
    data = load_dataset(config)
    with h5py.File(config.data.data_dir + "/" + os.listdir(config.data.data_dir)[0], "r") as f:
        raw = np.asarray(f["att"], np.float64)  # the class table the run was trained from (rows normalised on load)
    _, model = load_run(root / "run")
    x = data.features.read(np.concatenate([data.test_seen_loc, data.test_unseen_loc]))
    return {"root": root, "dir": root / "run", "config": config, "data": data, "raw": raw, "model": model, "x": x}


def _class_file(path, header, rows):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(",".join(header) + "\n")
        for name, values in rows:
            fh.write(",".join([name, *[repr(float(v)) for v in values]]) + "\n")
    return path


@pytest.fixture(scope="module")
def added(run):
    """Three new classes: one new description, a copy of a trained-unseen and a copy of a trained-seen class."""
    data, raw = run["data"], run["raw"]
    unseen, seen = int(data.unseen_classes[0]), int(data.seen_classes[0])
    new = np.random.default_rng(5).random(data.num_attributes)
    path = _class_file(
        run["root"] / "new_classes.csv",
        ["class", *data.attribute_names],
        [("new_bird", new), ("copy_of_unseen", raw[unseen] * 3.0), ("copy_of_seen", raw[seen])],
    )
    return {"path": path, "unseen": unseen, "seen": seen, "new": new}


# ------------------------------------------------------------------------------ what the run records


def test_run_records_what_new_rows_need(run, tmp_path):
    record = json.loads((run["dir"] / zeroshot.SEMANTICS_FILE).read_text())
    data = run["data"]
    assert record["attribute_names"] == list(data.attribute_names)
    assert record["class_names"] == list(data.class_names)
    assert record["normalisation"]["rule"] == "l2_rows" and record["normalisation"]["nonnegative"] is False
    assert record["unseen_classes"] == data.unseen_classes.tolist()
    # The rule reproduces the model's rows from the raw class table exactly.
    np.testing.assert_array_equal(zeroshot.normalise_rows(run["raw"], record["normalisation"]), data.att)
    # AWA2's rule clips negatives first (docs/reference.md §1.4), as its data reader does.
    rule = zeroshot.normalisation_rule(True)
    np.testing.assert_allclose(zeroshot.normalise_rows([[3.0, -1.0, 4.0]], rule), [[0.6, 0.0, 0.8]], rtol=1e-7)
    # A run without the record (older, or converted) derives the same from its config and data.
    import shutil

    older = tmp_path / "older"
    shutil.copytree(run["dir"], older)
    (older / zeroshot.SEMANTICS_FILE).unlink()
    derived = zeroshot.run_class_semantics(older, run["config"], run["model"])
    for key in ("attribute_names", "class_names", "normalisation", "unseen_classes"):
        assert derived[key] == record[key], key


# ------------------------------------------------------------------------------ exactness


def test_adding_classes_leaves_trained_scores_and_copies_score_alike(run, added):
    model, data, x = run["model"], run["data"], run["x"]
    re_model, classes, _ = zeroshot.retarget_run(run["dir"], added["path"])
    c = data.num_classes
    assert classes.names == list(data.class_names) + ["new_bird", "copy_of_unseen", "copy_of_seen"]
    assert classes.status[c:] == ["added"] * 3
    assert classes.status[added["unseen"]] == "trained-unseen" and classes.status[added["seen"]] == "trained-seen"
    assert set(range(c, c + 3)) <= set(classes.unseen_classes)  # new classes take the unseen side by default
    before, after = _logits(model, x), _logits(re_model, x)
    assert after.shape == (x.shape[0], c + 3)
    np.testing.assert_allclose(after[:, :c], before, rtol=1e-6, atol=1e-6 * np.abs(before).max())
    # a new class with an unseen class's description (any positive scale) scores exactly like it
    np.testing.assert_allclose(after[:, c + 1], after[:, added["unseen"]], rtol=1e-6, atol=1e-7)
    # a copy of a seen class on the unseen side differs by the margin only: 2 * bias * (w1 + w2)
    gap = 2.0 * model.bias_value * sum(model.fusion_weights)
    np.testing.assert_allclose(after[:, c + 2] - after[:, added["seen"]], gap, rtol=1e-5)
    # ... and on the seen side (--added-side seen) exactly like it
    seen_model, seen_classes, _ = zeroshot.retarget_run(run["dir"], added["path"], added_side="seen")
    same = _logits(seen_model, x)
    np.testing.assert_allclose(same[:, c + 2], same[:, added["seen"]], rtol=1e-6, atol=1e-7)
    assert set(range(c, c + 3)) <= set(seen_classes.seen_classes)


def test_replace_classes_serves_only_the_file(run, added, tmp_path):
    data, raw = run["data"], run["raw"]
    u = int(data.unseen_classes[1])
    s = int(data.seen_classes[1])
    path = _class_file(
        tmp_path / "only.csv",
        ["class", *data.attribute_names],
        [(data.class_names[s], raw[s]), (data.class_names[u], raw[u]), ("new_bird", added["new"])],
    )
    re_model, classes, _ = zeroshot.retarget_run(run["dir"], path, replace=True)
    assert classes.status == ["trained-seen", "trained-unseen", "added"]
    assert classes.seen_classes == [0] and classes.unseen_classes == [1, 2]
    before, after = _logits(run["model"], run["x"]), _logits(re_model, run["x"])
    np.testing.assert_allclose(after[:, :2], before[:, [s, u]], rtol=1e-6, atol=1e-6 * np.abs(before).max())
    only_seen = _class_file(tmp_path / "seen.csv", ["class", *data.attribute_names], [(data.class_names[s], raw[s])])
    with pytest.raises(MSDNError, match="no class on the unseen side"):
        zeroshot.retarget_run(run["dir"], only_seen, replace=True)


# ------------------------------------------------------------------------------ export, serving_open, evidence


@pytest.fixture(scope="module")
def exported(run, added):
    out = run["root"] / "models" / "msdn_demo"
    rc = export.main(
        ["--run", str(run["dir"]), "--out", str(out), "--classes", str(added["path"]), "--verify-samples", "2"]
    )
    assert rc == 0
    loaded = tf.saved_model.load(str(out / "1"))
    re_model, classes, _ = zeroshot.retarget_run(run["dir"], added["path"])
    return {"out": out, "loaded": loaded, "model": re_model, "classes": classes}


def test_export_with_classes_publishes_a_marked_version(run, added, exported):
    meta = serving_export.read_metadata(exported["out"])
    data = run["data"]
    c = data.num_classes
    assert meta["num_classes"] == c + 3
    assert meta["class_names"][c:] == ["new_bird", "copy_of_unseen", "copy_of_seen"]
    status = [e["status"] for e in meta["classes"]]
    assert status[c:] == ["added"] * 3 and status.count("trained-unseen") == len(data.unseen_classes)
    assert meta["class_file"]["sha256"] == hashlib.sha256(added["path"].read_bytes()).hexdigest()
    assert meta["attribute_names"] == list(data.attribute_names)
    assert meta["class_normalisation"]["rule"] == "l2_rows"
    assert set(range(c, c + 3)) <= set(meta["unseen_classes"])


def test_retargeted_export_equals_keras_and_serving_open(run, added, exported):
    x = run["x"][:6]
    loaded, model, classes = exported["loaded"], exported["model"], exported["classes"]
    default = {k: v.numpy() for k, v in loaded.signatures["serving_default"](features=tf.constant(x)).items()}
    want = _logits(model, x)
    np.testing.assert_allclose(default["scores"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # serving_open_sided with the served classes' RAW rows (the class-table form) and their sides
    rows = np.concatenate(
        [run["raw"], np.stack([added["new"], run["raw"][added["unseen"]] * 3.0, run["raw"][added["seen"]]])]
    )
    is_seen = np.zeros(len(classes.names), bool)
    is_seen[classes.seen_classes] = True
    sided = loaded.signatures["serving_open_sided"](
        features=tf.constant(x), class_attributes=tf.constant(rows, tf.float32), class_is_seen=tf.constant(is_seen)
    )
    sided = {k: v.numpy() for k, v in sided.items()}
    np.testing.assert_allclose(sided["scores"], default["scores"], rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for key in ("gzsl_class", "czsl_class", "top_k_classes", "top_k_attributes"):
        np.testing.assert_array_equal(sided[key], default[key], err_msg=key)
    # the evidence: the attribute->visual scores of the model, and their best ids
    scores_a2v = keras.ops.convert_to_numpy(model(x, training=False)["scores_a2v"])
    np.testing.assert_allclose(default["attribute_scores"], scores_a2v, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(default["top_k_attributes"][:, 0], np.argmax(scores_a2v, axis=1))
    # serving_open (no sides): every class on the unseen side, so seen columns gain 2 * bias * (w1 + w2)
    plain = loaded.signatures["serving_open"](features=tf.constant(x), class_attributes=tf.constant(rows, tf.float32))
    gap = 2.0 * model.bias_value * sum(model.fusion_weights) * is_seen
    np.testing.assert_allclose(plain["scores"].numpy(), default["scores"] + gap, rtol=1e-5, atol=1e-5)
    # a per-request vocabulary of two classes
    two = loaded.signatures["serving_open"](
        features=tf.constant(x), class_attributes=tf.constant(rows[[3, 1]], tf.float32)
    )
    np.testing.assert_allclose(two["scores"].numpy(), plain["scores"].numpy()[:, [3, 1]], rtol=1e-5, atol=1e-5)
    assert two["top_k_classes"].shape == (6, 2)


@pytest.mark.parametrize(
    "case, message",
    [
        ("wrong_k", "wrong attribute count in input class_attributes"),
        ("nan", "NaN or inf in input class_attributes"),
        ("empty", "empty class vocabulary in input class_attributes"),
        ("zero_row", "all-zero row in input class_attributes"),
        ("sides", "input class_is_seen must have one entry per row"),
        ("nan_features", "NaN or inf in input features"),
    ],
)
def test_serving_open_refuses_what_it_cannot_answer(run, exported, case, message):
    x = run["x"][:2].copy()
    rows = run["raw"][:4].astype(np.float32).copy()
    sides = np.zeros(4, bool)
    if case == "wrong_k":
        rows = rows[:, :-1]
    elif case == "nan":
        rows[1, 2] = np.nan
    elif case == "empty":
        rows, sides = rows[:0], sides[:0]
    elif case == "zero_row":
        rows[2] = 0.0
    elif case == "sides":
        sides = sides[:3]
    else:
        x[0, 0, 0] = np.nan
    fn = exported["loaded"].signatures["serving_open_sided"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        fn(features=tf.constant(x), class_attributes=tf.constant(rows), class_is_seen=tf.constant(sides))


def test_client_prints_attribute_evidence_by_name(run, exported):
    meta = serving_export.read_metadata(exported["out"])
    x = run["x"][:2]
    outputs = {
        k: v.numpy() for k, v in exported["loaded"].signatures["serving_default"](features=tf.constant(x)).items()
    }
    results = classify.summarize(outputs, meta)
    names = meta["attribute_names"]
    best = [names[i] for i in outputs["top_k_attributes"][0]]
    assert [a["name"] for a in results[0]["attributes"]] == best
    text = classify.format_text(
        {
            "model": "m",
            "transport": "grpc",
            "server": "s",
            "signature": "serving_default",
            "gamma": 0.0,
            "results": results,
        }
    )
    assert f"seen: {', '.join(best)}" in text
    # an export without attribute names prints ids
    unnamed = dict(meta, attribute_names=None)
    assert "attribute_" in classify.format_text(
        {
            "model": "m",
            "transport": "grpc",
            "server": "s",
            "signature": "x",
            "gamma": 0.0,
            "results": classify.summarize(outputs, unnamed),
        }
    )


# ------------------------------------------------------------------------------ bad class files


def _bad_file(tmp_path, run, case):
    names = list(run["data"].attribute_names)
    raw = run["raw"]
    header = "class," + ",".join(names)
    good = "new_bird," + ",".join("0.5" for _ in names)
    body = {
        "wrong_count": ("class," + ",".join(names[:-1]) + "\n" + good, "row 1, column"),
        "wrong_name": (header.replace(names[2], "has_wing_colour::red") + "\n" + good, "row 1, column 4"),
        "existing": (header + "\n" + run["data"].class_names[0] + "," + ",".join(map(str, raw[0])), "row 2, column 1"),
        "duplicate": (header + "\n" + good + "\n" + good, "row 3, column 1"),
        "nan": (header + "\n" + good.replace("0.5", "nan", 1), "row 2, column 2"),
        "empty_cell": (
            header + "\n" + "x," + ",".join(["1"] * (len(names) - 1)) + ",",
            f"row 2, column {len(names) + 1}",
        ),
        "not_number": (
            header + "\n" + good + "\nother," + ",".join(["1", "two"] + ["1"] * (len(names) - 2)),
            "row 3, column 3",
        ),
        "short_row": (header + "\n" + "x,1,2", "row 2, column 4"),
        "header": ("name," + ",".join(names) + "\n" + good, "row 1, column 1"),
        "zero_row": (header + "\n" + "x," + ",".join(["0"] * len(names)), "row 2"),
        "no_rows": (header + "\n", "row 2"),
        "empty_name": (header + "\n" + good.replace("new_bird", " ", 1), "row 2, column 1"),
        "inf": (header + "\n" + good.replace("0.5", "inf", 2), "row 2, column 2"),
        "extra_cell": (header + "\n" + good + ",7", f"row 2, column {len(names) + 2}"),
        "repeated_attribute": (
            "class," + ",".join(names[:-1] + [names[0]]) + "\n" + good,
            f"row 1, column {len(names) + 1}",
        ),
        "empty": ("", "row 1"),
    }
    if case == "missing":
        return tmp_path / "nowhere.csv", "row 1"
    if case == "folder":
        return tmp_path, "row 1"
    if case == "non_utf8":
        path = tmp_path / "latin1.csv"
        path.write_bytes((header + "\n" + "Mönch," + ",".join(["1"] * len(names)) + "\n").encode("latin-1"))
        return path, "row 2, column 1"
    text, where = body[case]
    path = tmp_path / f"{case}.csv"
    path.write_text(text, encoding="utf-8")
    return path, where


BAD_CASES = [
    "wrong_count",
    "wrong_name",
    "existing",
    "duplicate",
    "nan",
    "empty_cell",
    "not_number",
    "short_row",
    "header",
    "zero_row",
    "no_rows",
    "empty",
    "non_utf8",
    "inf",
    "empty_name",
    "extra_cell",
    "repeated_attribute",
    "missing",
    "folder",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_class_file_is_one_line_naming_row_and_column(run, tmp_path, case):
    path, where = _bad_file(tmp_path, run, case)
    semantics = zeroshot.run_class_semantics(run["dir"])
    with pytest.raises(DataError) as info:
        zeroshot.read_class_file(path, semantics, existing_names=run["data"].class_names)
    message = str(info.value)
    assert message.startswith(f"{path}: {where}") and "\n" not in message, message


@pytest.mark.parametrize("case", ["existing", "non_utf8", "empty", "wrong_name"])
def test_bad_class_file_publishes_nothing(run, tmp_path, capsys, case):
    path, where = _bad_file(tmp_path, run, case)
    out = tmp_path / "models" / "m"
    rc = export.main(["--run", str(run["dir"]), "--out", str(out), "--classes", str(path), "--no-verify"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"error: {path}: {where}"), err
    assert not out.exists() or not any(p.name.isdigit() for p in out.iterdir())


def test_class_file_reader_properties(tmp_path):
    """Property test: any finite positive rows round-trip; any non-UTF-8 byte is named by row."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    semantics = {"attribute_names": ["a", "b", "c"], "normalisation": zeroshot.normalisation_rule(False)}
    value = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)

    @settings(max_examples=30, deadline=None)
    @given(st.lists(st.tuples(value, value, value), min_size=1, max_size=5), st.integers(0, 4))
    def check(rows, bad_at):
        path = tmp_path / "p.csv"
        lines = ["class,a,b,c"] + [f"c{i}," + ",".join(repr(v) for v in r) for i, r in enumerate(rows)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        table = zeroshot.read_class_file(path, semantics)
        np.testing.assert_array_equal(table.values, np.asarray(rows))
        bad_row = min(bad_at, len(rows)) + 1
        raw = "\n".join(lines).encode()
        parts = raw.split(b"\n")
        parts[bad_row - 1] = parts[bad_row - 1] + b"\xff"
        path.write_bytes(b"\n".join(parts))
        with pytest.raises(DataError, match=f"row {bad_row}, column"):
            zeroshot.read_class_file(path, semantics)

    check()


def test_export_and_evaluate_refuse_replace_without_classes(run, tmp_path, capsys):
    assert export.main(["--run", str(run["dir"]), "--out", str(tmp_path / "m"), "--replace-classes"]) == 2
    assert "--replace-classes needs --classes" in capsys.readouterr().err


# ------------------------------------------------------------------------------ usefulness


@pytest.mark.slow
def test_held_out_classes_added_after_training_are_recognised(tmp_path, capsys):
    """Two of the demo's unseen classes never reach training; added afterwards, they are recognised far
    above chance, and evaluate --classes reports the same numbers as the experiment."""
    from msdn_tf.cli import held_out
    from tests.helpers import write_tiny_yaml

    tiny = write_tiny_yaml(tmp_path)
    out = tmp_path / "held"
    rc = held_out.main(
        ["--config", str(tiny), "--set", f"data.data_dir={tmp_path / 'data'}", "--hold-out", "2", "--out", str(out)]
    )
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    added = results["runs"]["added"]
    assert len(results["held_out_classes"]) == 2
    # the run that never saw them has no trace of them
    semantics = json.loads((out / "added" / zeroshot.SEMANTICS_FILE).read_text())
    assert not set(results["held_out_classes"]) & set(semantics["class_names"])
    assert added["held_out_czsl"] >= 2 * added["chance_czsl"], results["runs"]
    assert added["acc"] >= 2 * added["chance_czsl"]
    assert "held-out classes added after training" in (out / "results.md").read_text()
    # the command a user runs on the same files gives the same figures
    rc = evaluate.main(
        [
            "--run",
            str(out / "added"),
            "--classes",
            results["class_file"],
            "--data-dir",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    assert rc == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("acc", "U", "S", "H"):
        assert metrics[key] == pytest.approx(added[key]), key
    assert metrics["by_status"]["added"]["classes"] == 2
    assert "CZSL acc %" in capsys.readouterr().out


def test_local_server_answers_a_per_request_vocabulary(run, added, exported):
    """The TF Serving test double serves serving_open(_sided) like any signature, over gRPC and REST."""
    from msdn_tf.serving.local_server import start_local_server

    meta = serving_export.read_metadata(exported["out"])
    x = run["x"][:3].astype(np.float32)
    rows = np.stack([run["raw"][added["unseen"]], added["new"], run["raw"][added["seen"]]]).astype(np.float32)
    names = ["a", "new_bird", "b"]
    handle = start_local_server(exported["out"], "msdn_demo", grpc_port=0, rest_port=0)
    try:
        answers = [
            classify.classify_open(
                model="msdn_demo", features=x, class_attributes=rows, class_names=names, metadata=meta, **where
            )
            for where in ({"server": handle.grpc_address}, {"server": None, "rest": handle.rest_url})
        ]
        grpc_names, rest_names = ([[t["name"] for t in r["top_k"]] for r in a["results"]] for a in answers)
        assert grpc_names == rest_names
        direct = exported["loaded"].signatures["serving_open"](
            features=tf.constant(x), class_attributes=tf.constant(rows)
        )
        assert [r["gzsl"]["name"] for r in answers[0]["results"]] == [names[i] for i in direct["gzsl_class"].numpy()]
        assert answers[0]["results"][0]["attributes"][0]["name"] in meta["attribute_names"]
        sided = classify.classify_open(
            model="msdn_demo",
            features=x,
            class_attributes=rows,
            class_names=names,
            class_is_seen=[False, False, True],
            metadata=meta,
            server=handle.grpc_address,
        )
        assert sided["signature"] == "serving_open_sided"
        with pytest.raises(
            classify.ServerRefused, match="INVALID_ARGUMENT.*wrong attribute count in input class_attributes"
        ):
            classify.classify_open(
                model="msdn_demo",
                features=x,
                class_attributes=rows[:, :-1],
                class_names=names,
                metadata=meta,
                server=handle.grpc_address,
            )
    finally:
        handle.stop()
