"""A run is never lost or mixed up; typed flags are used as typed; degenerate data and bad files are one line.

Issue 21 §1-3 and §5 on the training, data and configuration side (docs/reliability.md,
"Run directories, flags and degenerate data").
"""

import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest

from msdn_tf.cli import train
from msdn_tf.config import flag_values, resolve_config
from msdn_tf.errors import ConfigError, DataError, MSDNError
from msdn_tf.runlock import LOCK_FILE, RunLock, writer_of
from msdn_tf.training.loop import TrainingInterrupted, TrainingSession, run_training
from tests.helpers import write_tiny_yaml

QUICK = ["train.iterations=6", "train.eval_every=2", "data.batch_size=8", "data.eval_batch_size=32"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_yaml(tmp_path, eval_initial=False)


def config_of(tiny, data_dir, *overrides):
    return resolve_config("demo", [tiny], [*QUICK, *overrides], flags=[("data.data_dir", str(data_dir), "--data-dir")])


@pytest.fixture
def live_pid():
    """A process that is alive for the test (a stand-in for another writer)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def write_lock(run_dir, pid, host=None, command="train"):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(
        json.dumps({"pid": pid, "host": host or socket.gethostname(), "command": command, "started": "t"})
    )


# --------------------------------------------------------------------------- §2 typed flags
@pytest.mark.parametrize("typed", ["runs/dd #2", "null", "a: b", "[x]", "~"])
def test_flags_are_set_as_typed_values_never_parsed_as_yaml(typed, capsys):
    args = train.build_parser().parse_args(["--data-dir", typed, "--seed", "3"])
    config = train.config_from_args(args)
    assert config.data.data_dir == typed and config.train.seed == 3
    assert flag_values(resolve_config("demo"), [("data.cache_dir", typed, "--cache-dir")]).data.cache_dir == typed


def test_every_command_builds_its_config_from_typed_flags():
    """No command turns a flag into ``section.key=value`` text again (it would be re-read as YAML)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parent.parent / "msdn_tf"
    offenders = [
        f"{p.relative_to(root)}:{n}"
        for p in root.rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r'f"(data|train|model|loss|optimizer|demo)\.[a-z_]+=\{', line)
    ]
    assert offenders == []


def test_empty_flag_value_is_refused(capsys):
    assert train.main(["--data-dir", "", "--print-config"]) == 2
    assert "--data-dir: empty value" in one_error_line(capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "-1"], "'train.seed' must be in [0, 4294967295], got -1"),
        (["--seed", str(2**32)], "'train.seed' must be in [0, 4294967295]"),
        (["--set", "demo.seed=-5"], "'demo.seed' must be in [0, 4294967295]"),
        (["--set", "model.fusion_weights=[0, 0]"], "'model.fusion_weights' must be two weights >= 0"),
        (["--set", "model.fusion_weights=[-1, 1]"], "'model.fusion_weights' must be two weights >= 0"),
        (["--set", "model.bias=1e30"], "'model.bias' must be in [-100.0, 100.0], got 1e+30"),
        (["--set", "demo.num_unseen=40"], "'demo.num_unseen' must be below demo.num_classes = 40"),
        (["--set", "demo.attributes_per_class=30"], "'demo.attributes_per_class' must be at most"),
        (["--set", "demo.map_size=2"], "'demo.map_size' must be >= 3"),
        (["--set", "demo.feature_dim=2"], "'demo.feature_dim' must be >= 4"),
        (["--set", "demo.images_per_class=2", "--set", "demo.test_seen_fraction=0.9"], "leaves no training image"),
    ],
)
def test_settings_that_make_the_model_meaningless_are_refused_naming_the_key(argv, message, capsys):
    assert train.main([*argv, "--print-config"]) == 2
    assert message in one_error_line(capsys)


def test_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train:\n  run_name: caf\xe9\n".encode("latin-1"))
    assert train.main(["--config", str(bad), "--print-config"]) == 2
    assert f"{bad}: config file is not UTF-8 text" in one_error_line(capsys)


def _resume_args(run_dir, *extra):
    return train.build_parser().parse_args(["--run-dir", str(run_dir), "--resume", *extra])


def test_resume_refuses_precision_and_overwrite(tmp_path):
    from msdn_tf.config import save_config
    from msdn_tf.training.resume import resume_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(resolve_config("demo"), run / "config.yaml")
    with pytest.raises(ConfigError, match=r"refusing --precision mixed_bfloat16 \(the run used float32\)"):
        resume_config(_resume_args(run, "--precision", "mixed_bfloat16"))
    with pytest.raises(ConfigError, match="refusing --overwrite"):
        resume_config(_resume_args(run, "--overwrite"))
    config, changes = resume_config(_resume_args(run, "--data-dir", "moved #2"))
    assert config.data.data_dir == "moved #2" and changes == {"data.data_dir": (None, "moved #2")}


# --------------------------------------------------------------------------- §1 one writer, nothing destroyed
def test_a_second_writer_is_refused_naming_the_holder(tiny, tmp_path, live_pid, capsys):
    run = tmp_path / "run"
    write_lock(run, live_pid, command="train --resume")
    argv = ["--dataset", "demo", "--config", str(tiny), "--data-dir", str(tmp_path / "data"), "--run-dir", str(run)]
    assert train.main(argv) == 2
    line = one_error_line(capsys)
    assert f"{run} is being written by train --resume (process {live_pid} on {socket.gethostname()}" in line
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written, the lock untouched
    # convert is refused the same way
    from msdn_tf.cli import convert
    from tests.helpers import torch_fixture

    assert (
        convert.main(["--torch-checkpoint", torch_fixture("tiny_msdn"), "--dataset", "custom", "--out", str(run)]) == 2
    )
    assert "is being written by train --resume" in one_error_line(capsys)
    # a lock of another host is never taken over; the message says which file to remove
    write_lock(run, 1, host="elsewhere.example")
    with pytest.raises(MSDNError, match=rf"process 1 on elsewhere\.example.*remove {run / LOCK_FILE}"):
        with RunLock(run, "train"):
            pass


def test_readers_say_the_run_is_being_written(tmp_path, live_pid):
    from msdn_tf.evaluation.runs import load_run_model

    run = tmp_path / "run"
    write_lock(run, live_pid)
    assert writer_of(run).startswith(f"train (process {live_pid}")
    with pytest.raises(MSDNError, match=r"is being written by train .* no model\.keras yet: wait for it") as err:
        load_run_model(run)
    assert "--resume" not in str(err.value)


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer runs
    run = tmp_path / "run"
    write_lock(run, proc.pid)
    notes = []
    with RunLock(run, "train", log=notes.append):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "took over the lock of train (process" in notes[0] and "no longer runs" in notes[0]
    assert not (run / LOCK_FILE).exists()


def test_train_over_a_model_needs_overwrite(tiny, tmp_path, capsys):
    run = tmp_path / "converted"
    run.mkdir()
    (run / "model.keras").write_bytes(b"a converted model")
    (run / "config.yaml").write_text("train: {seed: 1}\n")
    argv = ["--dataset", "demo", "--config", str(tiny), "--data-dir", str(tmp_path / "data"), "--run-dir", str(run)]
    assert train.main(argv) == 2
    assert "already holds a model (model.keras); pass --overwrite" in one_error_line(capsys)
    assert (run / "model.keras").read_bytes() == b"a converted model"
    assert (run / "config.yaml").read_text() == "train: {seed: 1}\n"


def test_a_failed_new_run_leaves_nothing_behind(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--dataset", "demo", "--config", str(tiny), "--data-dir", str(tmp_path / "data"), "--run-dir", str(run)]
    assert train.main([*argv, "--set", "optimizer.learning_rate=1e30"]) == 2
    assert "NaN or infinite" in one_error_line(capsys)
    assert not run.exists()  # no config.yaml, no TensorBoard events, no empty folder


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run interrupted (Ctrl-C) at step 4, after the checkpoint of step 2."""
    base = tmp_path_factory.mktemp("interrupted")
    tiny = write_tiny_yaml(base, eval_initial=False)
    config = config_of(tiny, base / "data")

    def ctrl_c(step, **kwargs):
        if step == 4:
            raise KeyboardInterrupt

    run = base / "run"
    with pytest.raises(TrainingInterrupted) as err:
        run_training(config, run_dir=run, log=lambda *a: None, eval_hooks=[ctrl_c])
    return types.SimpleNamespace(run=run, tiny=tiny, base=base, config=config, message=str(err.value))


def test_ctrl_c_names_the_step_and_the_intact_checkpoint(interrupted):
    run = interrupted.run
    assert interrupted.message == (
        f"interrupted at step 4; the checkpoint of step 2 in {run / 'checkpoint'} is intact; "
        f"resume with python -m msdn_tf.train --run-dir {run} --resume"
    )
    assert TrainingInterrupted.exit_code == 130
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    assert (run / "config.yaml").is_file() and not (run / LOCK_FILE).exists()


def test_ctrl_c_in_the_command_is_one_line_and_exit_130(tiny, tmp_path, capsys, monkeypatch):
    def interrupt(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainingSession, "train", interrupt)
    run = tmp_path / "run"
    argv = ["--dataset", "demo", "--config", str(tiny), "--data-dir", str(tmp_path / "data"), "--run-dir", str(run)]
    assert train.main(argv) == 130
    line = one_error_line(capsys)
    assert line.startswith("error: interrupted at step 0; no checkpoint had been written")
    assert not run.exists()


def test_resume_refuses_data_of_another_problem(interrupted, tmp_path):
    from msdn_tf.data.registry import load_dataset

    data = load_dataset(interrupted.config)
    seen, unseen = data.seen_classes, data.unseen_classes
    moved = int(seen[0])  # one seen class becomes unseen
    rows_moved = np.flatnonzero(data.labels == moved)
    other = type(data)(
        **{
            **data.__dict__,
            "trainval_loc": np.setdiff1d(data.trainval_loc, rows_moved),
            "test_seen_loc": np.setdiff1d(data.test_seen_loc, rows_moved),
            "test_unseen_loc": np.union1d(data.test_unseen_loc, rows_moved),
            "train_loc": None,
            "val_loc": None,
        }
    )
    before = sorted(p.name for p in interrupted.run.rglob("*"))
    with pytest.raises(DataError, match=rf"unseen classes \(now also \[{moved}\]"):
        run_training(interrupted.config, run_dir=interrupted.run, resume=True, data=other, log=lambda *a: None)
    assert sorted(p.name for p in interrupted.run.rglob("*")) == before
    assert len(unseen) + 1 == len(other.unseen_classes)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda s: {**s, "step": "abc"}, "'step' must be a whole number >= 0"),
        (lambda s: {**s, "step": -3}, "'step' must be a whole number >= 0"),
        (lambda s: {**s, "weights": "../../etc/passwd"}, "'weights' must name a file step_NNNNNNNN.weights.npz"),
        (lambda s: {**s, "history": {"a": 1}}, "'history' must be a list"),
        (lambda s: [1, 2], "missing step, weights"),
    ],
)
def test_tampered_state_json_is_one_line(interrupted, tamper, message, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(interrupted.run, run)
    state_path = run / "checkpoint" / "state.json"
    state_path.write_text(json.dumps(tamper(json.loads(state_path.read_text()))))
    with pytest.raises(MSDNError, match=rf"state\.json: corrupt checkpoint state \(.*{message[:20]}"):
        run_training(interrupted.config, run_dir=run, resume=True, log=lambda *a: None)


def test_tampered_optimizer_file_is_one_line(interrupted, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(interrupted.run, run)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    optimizer = run / "checkpoint" / state["optimizer"]
    with np.load(optimizer) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    arrays[3] = np.zeros((2, 2), np.float32)
    with open(optimizer, "wb") as f:
        np.savez(f, *arrays)
    with pytest.raises(MSDNError, match=r"optimizer variables '.*' has shape \(2, 2\) in the checkpoint"):
        run_training(interrupted.config, run_dir=run, resume=True, log=lambda *a: None)
    optimizer.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(MSDNError, match="unreadable optimizer state"):
        run_training(interrupted.config, run_dir=run, resume=True, log=lambda *a: None)


def test_train_overwrite_replaces_the_whole_run(interrupted, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(interrupted.run, run)
    (run / "model.keras").write_bytes(b"old")
    notes = []
    results = run_training(interrupted.config, run_dir=run, overwrite=True, log=notes.append)
    assert results["final"]["step"] == 6
    assert any("--overwrite" in n and "checkpoint/" in n for n in notes)
    assert (run / "model.keras").read_bytes() != b"old"
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6 and [h["step"] for h in state["history"]] == [2, 4, 6]


# --------------------------------------------------------------------------- §5 model files that are not an MSDN
def test_model_file_that_is_not_an_msdn_is_one_line(tmp_path):
    import keras

    from msdn_tf.evaluation.runs import load_run_model

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"not a zip at all")
    with pytest.raises(MSDNError, match=r"model\.keras: not a Keras model file msdn-tf can read"):
        load_run_model(run)
    inp = keras.Input((3,))
    keras.Model(inp, keras.layers.Dense(2)(inp)).save(run / "model.keras")
    with pytest.raises(MSDNError, match=r"model\.keras: holds a Functional, not an MSDN model"):
        load_run_model(run)
    keras.Model(inp, keras.layers.Lambda(lambda x: x * 2)(inp)).save(run / "model.keras")
    with pytest.raises(MSDNError, match=r"holds a Lambda layer \(Python code\); msdn-tf never loads code"):
        load_run_model(run)


# --------------------------------------------------------------------------- §3 degenerate data
def _data(features=None, att=None, w2v=None, **changes):
    from msdn_tf.data.base import ArrayFeatures, ZSLData

    base = dict(
        name="t",
        features=ArrayFeatures(np.ones((6, 2, 3)) if features is None else features),
        labels=[0, 0, 1, 2, 2, 2],
        trainval_loc=[0],
        test_seen_loc=[1],
        test_unseen_loc=[3, 4],
        att=np.eye(3) if att is None else att,
        w2v=np.ones((3, 2)) if w2v is None else w2v,
        class_names=list("abc"),
        attribute_names=[f"a{i}" for i in range((np.eye(3) if att is None else att).shape[1])],
        source="t.h5",
    )
    base.update(changes)
    return ZSLData(**base)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(features=np.ones((6, 0, 3))),
            r"zero regions \(H x W of the feature maps\), shape \(N, R, F\) = \(6, 0, 3\)",
        ),
        (dict(features=np.ones((6, 2, 0))), r"zero feature channels, shape \(N, R, F\) = \(6, 2, 0\)"),
        (dict(att=np.ones((3, 0)), w2v=np.ones((0, 2))), r"t\.h5: 'att' has zero attributes, shape \(3, 0\)"),
        (dict(w2v=np.ones((3, 0))), r"t\.h5: 'w2v_att' has zero-length word vectors, shape \(3, 0\)"),
        (dict(test_seen_loc=[0, 1]), r"1 row\(s\) are in both 'trainval_loc' and 'test_seen_loc' \(row 0\).*leakage"),
        (
            dict(labels=[0, 0, 1, 2, 2, 1], test_seen_loc=[1, 5], test_unseen_loc=[3, 4, 5]),
            r"'test_seen_loc' and 'test_unseen_loc' \(row 5\)",
        ),
        (dict(features=np.array([["x"] * 3] * 2 * 6).reshape(6, 2, 3)), "feature values must be real numbers.*strings"),
        (dict(features=np.ones((6, 2, 3), complex)), "feature values must be real numbers.*complex"),
        (dict(features=np.ones((6, 2, 3), bool)), "feature values must be real numbers.*booleans"),
    ],
)
def test_degenerate_data_is_refused_at_load(kwargs, message):
    with pytest.raises(DataError, match=message):
        _data(**kwargs)


@pytest.mark.parametrize("dtype", ["S4", "complex64", "bool"])
def test_hdf5_feature_maps_of_strings_complex_or_booleans_are_refused(tmp_path, dtype):
    import h5py

    from msdn_tf.data.hdf5 import HDF5Features

    path = tmp_path / "f.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("feature_map", data=np.ones((2, 3, 2, 2)).astype(dtype))
    with pytest.raises(DataError, match=rf"{path}: 'feature_map': feature values must be real numbers"):
        HDF5Features(str(path))


def test_zero_channel_and_zero_attribute_files_are_one_line(tmp_path):
    """Zero attributes aborted the process inside oneDNN; zero channels was a 60-line InvalidArgumentError."""
    import h5py

    from msdn_tf.data.hdf5 import load_feature_map_hdf5

    for name, (fmap, att, w2v) in {
        "channels": (np.ones((6, 0, 2, 2)), np.eye(3), np.ones((3, 4))),
        "attributes": (np.ones((6, 3, 2, 2)), np.ones((3, 0)), np.ones((0, 4))),
    }.items():
        path = tmp_path / f"{name}.hdf5"
        with h5py.File(path, "w") as f:
            f["feature_map"] = fmap.astype(np.float32)
            f["labels"] = np.array([0, 0, 1, 2, 2, 2])
            f["trainval_loc"], f["test_seen_loc"], f["test_unseen_loc"] = [0], [1], [3, 4]
            f["att"], f["w2v_att"] = att, w2v
        with pytest.raises(DataError, match=f"zero (feature )?{name}"):
            load_feature_map_hdf5(str(path))


# --------------------------------------------------------------------------- §5 errors inside tf.data
class BrokenRows:
    """A feature source whose row ``row`` cannot be read (a corrupt HDF5 chunk)."""

    def __init__(self, inner, row):
        self.inner, self.row, self.shape, self.path = inner, int(row), inner.shape, "broken.hdf5"

    def read(self, indices):
        if self.row in np.asarray(indices):
            raise OSError("Can't read data (inflate() failed)")
        return self.inner.read(indices)


@pytest.mark.parametrize("split", ["trainval_loc", "test_unseen_loc"])
def test_errors_inside_tf_data_are_one_line_naming_the_file(tiny, tmp_path, split):
    from msdn_tf.data.registry import load_dataset

    config = config_of(tiny, tmp_path / "data", "data.on_device=false")
    data = load_dataset(config)
    data.features = BrokenRows(data.features, getattr(data, split)[0])
    with pytest.raises(MSDNError) as err:
        run_training(config, run_dir=tmp_path / "run", data=data, log=lambda *a: None)
    text = str(err.value)
    assert "\n" not in text and "reading broken.hdf5 failed" in text and "inflate() failed" in text
    assert not (tmp_path / "run").exists()
