"""Bad input and faults in training, data and configuration (docs/reliability.md).

Each test is one row of the table in docs/reliability.md: the failure is caught,
reported in one line naming the step, file, key or path, the exit status is 2,
and nothing on disk claims a result that was not reached.
"""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from msdn_tf.cli import train
from msdn_tf.config import resolve_config
from msdn_tf.errors import ConfigError, DataError, NonFiniteError
from msdn_tf.training.loop import run_training
from tests.helpers import TINY_DEMO_FIELDS, write_tiny_yaml

SMALL_DEMO = TINY_DEMO_FIELDS


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_yaml(tmp_path, eval_initial=False)


def cli(tiny, tmp_path, *extra):
    return ["--dataset", "demo", "--config", str(tiny), "--data-dir", str(tmp_path / "data"), *extra]


def tiny_config(tiny, tmp_path, *overrides):
    return resolve_config("demo", [tiny], [f"data.data_dir={tmp_path / 'data'}", *overrides])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def assert_no_result(run):
    assert not (run / "model.keras").exists()
    assert not (run / "results.json").exists()


# --------------------------------------------------------------------------- numeric guards
class PoisonedFeatures:
    """A feature source that returns NaN for one row once ``active`` (a file going bad mid-run)."""

    def __init__(self, inner, row, value=np.nan):
        self.inner, self.row, self.value, self.active = inner, int(row), value, True
        self.shape, self.path = inner.shape, "poisoned.hdf5"

    def read(self, indices):
        x = np.array(self.inner.read(indices), dtype=np.float32)
        if self.active:
            x[np.asarray(indices) == self.row] = self.value
        return x


def test_nan_in_feature_file_stops_training_naming_file_row_and_step(tiny, tmp_path, capsys):
    import h5py

    from msdn_tf.data.registry import load_dataset

    data = load_dataset(tiny_config(tiny, tmp_path))
    row, path = int(data.trainval_loc[5]), data.features.path
    data.features._file.close()
    del data
    with h5py.File(path, "r+") as f:
        f["feature_map"][row, 3, 0, 0] = np.nan
    run = tmp_path / "run"
    assert train.main(cli(tiny, tmp_path, "--run-dir", str(run))) == 2
    line = one_error_line(capsys)
    assert "training step" in line and path in line and f"row {row}" in line
    assert_no_result(run)


def test_nan_after_a_checkpoint_keeps_the_checkpoint_and_writes_no_result(tiny, tmp_path):
    from msdn_tf.data.registry import load_dataset

    config = tiny_config(tiny, tmp_path, "data.on_device=false")  # rows are read every step
    data = load_dataset(config)
    data.features = PoisonedFeatures(data.features, data.trainval_loc[0])
    data.features.active = False

    def go_bad(step, **kwargs):  # the file turns bad after the first checkpoint
        data.features.active = True

    run = tmp_path / "run"
    with pytest.raises(
        NonFiniteError,
        match=r"training step (3[1-9]|[45]\d|60):.*poisoned\.hdf5.*"
        rf"row {data.trainval_loc[0]}\b",
    ):
        run_training(config, run_dir=run, data=data, log=lambda *a: None, eval_hooks=[go_bad])
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 30 and (run / "checkpoint" / state["weights"]).is_file()
    assert_no_result(run)


def test_nan_in_test_features_is_caught_at_evaluation_naming_the_row(tiny, tmp_path):
    from msdn_tf.data.registry import load_dataset

    config = tiny_config(tiny, tmp_path)
    data = load_dataset(config)
    row = int(data.test_unseen_loc[2])
    data.features = PoisonedFeatures(data.features, row)
    with pytest.raises(
        NonFiniteError,
        match=rf"evaluation after step 30: poisoned\.hdf5: feature row {row} "
        r"\(test_unseen_loc\)",
    ):
        run_training(config, run_dir=tmp_path / "run", data=data, log=lambda *a: None)
    assert_no_result(tmp_path / "run")


def test_overflowing_update_stops_at_the_first_bad_step(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(cli(tiny, tmp_path, "--run-dir", str(run), "--set", "optimizer.learning_rate=1e30")) == 2
    line = one_error_line(capsys)
    assert "training step 1:" in line or "training step 2:" in line, line
    assert "NaN or infinite" in line
    assert_no_result(run)


def test_nonfinite_code_names_each_check():
    import keras

    from msdn_tf.model import MSDN

    ok = np.ones((2, 3), "float32")
    bad = np.array([[1.0, np.inf]], "float32")
    code = lambda f, g, w: float(keras.ops.convert_to_numpy(MSDN.nonfinite_code(f, g, w)))
    assert code(ok, [ok], [ok]) == 0
    assert code(bad, [ok], [ok]) == 1 and code(ok, [bad, None], [ok]) == 2 and code(ok, [ok], [bad]) == 4
    assert code(bad, [bad], [bad]) == 7


def test_results_json_is_never_written_with_nan(tmp_path):
    from msdn_tf.utils import write_json

    with pytest.raises(NonFiniteError, match=r"final\.acc is NaN"):
        write_json(tmp_path / "r.json", {"final": {"acc": float("nan")}})
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    "override,message",
    [
        ("optimizer.learning_rate=.nan", "'optimizer.learning_rate' must be a finite number"),
        ("optimizer.learning_rate=nan", "'optimizer.learning_rate' must be a finite number"),
        ("optimizer.learning_rate=-0.1", "'optimizer.learning_rate' must be > 0.0"),
        ("optimizer.rho=1.0", "'optimizer.rho' must be in (0.0, 1.0)"),
        ("optimizer.epsilon=-1e-8", "'optimizer.epsilon' must be > 0.0"),
        ("optimizer.momentum=-0.5", "'optimizer.momentum' must be in [0.0, 1.0)"),
        ("optimizer.weight_decay=-1e-4", "'optimizer.weight_decay' must be >= 0.0"),
        ("data.batch_size=0", "'data.batch_size' must be >= 1"),
        ("data.eval_batch_size=-3", "'data.eval_batch_size' must be >= 1"),
        ("model.fusion_weights=[.inf, 0.1]", "'model.fusion_weights' must be a finite number"),
        ("loss.lambda_cal=-1", "'loss.lambda_cal' must be >= 0.0"),
        ("train.iterations=0", "'train.iterations' must be >= 1"),
    ],
)
def test_invalid_hyperparameters_are_config_errors_naming_the_override(override, message, capsys):
    assert train.main(["--dataset", "demo", "--set", override, "--print-config"]) == 2
    line = one_error_line(capsys)
    assert f"--set {override}" in line and message in line


def test_invalid_value_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  rho: 1.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: 'optimizer\.rho' must be in \(0\.0, 1\.0\), got 1\.5"):
        resolve_config("demo", [bad])


def test_invalid_value_in_a_runs_config_names_that_file(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.yaml").write_text("optimizer:\n  learning_rate: -1.0\n")
    assert train.main(["--run-dir", str(run), "--resume"]) == 2
    assert f"{run / 'config.yaml'}: 'optimizer.learning_rate' must be > 0.0" in one_error_line(capsys)


# --------------------------------------------------------------------------- index arrays and labels
def _data(**changes):
    from msdn_tf.data.base import ArrayFeatures, ZSLData

    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    args = dict(
        name="t",
        features=ArrayFeatures(np.ones((8, 2, 3))),
        labels=labels,
        trainval_loc=[0, 1, 2, 3],
        test_seen_loc=[6, 7],
        test_unseen_loc=[4, 5],
        att=np.eye(3),
        w2v=np.ones((3, 2)),
        class_names=list("abc"),
        attribute_names=list("xyz"),
        source="src.hdf5",
    )
    args.update(changes)
    return ZSLData(**args)


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"trainval_loc": [0.0, 1.5, 2.0, 3.0]},
            r"src\.hdf5: 'trainval_loc' must hold whole numbers, but entry 1 is 1\.5",
        ),
        ({"test_seen_loc": [6.0, np.nan]}, r"'test_seen_loc' must hold whole numbers, but entry 1 is nan"),
        ({"trainval_loc": [0, 1, 2, 2]}, r"'trainval_loc' lists 1 row\(s\) more than once \(e\.g\. row 2 2 times\)"),
        (
            {"labels": np.array(list("aabbccab"))},
            r"'labels' must hold integers \(0-based ids\), got strings, e\.g\. 'a'",
        ),
        ({"labels": np.array([True] * 8)}, r"'labels' must hold integers.*booleans"),
        ({"w2v": np.array([[1.0, 1.0], [np.nan, 0.0], [1.0, 0.0]])}, r"'w2v_att'.*for attribute\(s\) \['y'\]"),
    ],
)
def test_bad_index_arrays_and_labels_are_named(changes, message):
    with pytest.raises(DataError, match=message):
        _data(**changes)


def test_whole_float_indices_still_load():  # MATLAB stores indices as doubles
    data = _data(trainval_loc=np.array([0.0, 1.0, 2.0, 3.0]))
    assert data.trainval_loc.dtype == np.int64


# --------------------------------------------------------------------------- --resume with flags
def test_resume_refuses_flags_that_change_the_run(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        train.main(cli(tiny, tmp_path, "--run-dir", str(run), "--iterations", "2", "--set", "train.eval_every=2")) == 0
    )
    capsys.readouterr()
    for extra, named in (
        (["--seed", "5"], "--seed 5"),
        (["--dataset", "cub"], "--dataset cub"),
        (["--set", "loss.lambda_cal=0.5"], "--set loss.lambda_cal=0.5"),
        (["--config", str(tiny)], f"--config {tiny}"),
        (["--strategy", "mirrored"], "--strategy mirrored"),
    ):
        assert train.main(["--run-dir", str(run), "--resume", *extra]) == 2
        line = one_error_line(capsys)
        assert f"refusing {named}" in line and "start a new run" in line
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2


def test_resume_with_more_iterations_trains_on_and_records_it(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    base = cli(tiny, tmp_path, "--run-dir", str(run), "--set", "train.eval_every=2")
    assert train.main([*base, "--iterations", "2"]) == 0
    import shutil

    shutil.copytree(tmp_path / "data", tmp_path / "moved")  # the data moved: allowed, recorded
    assert (
        train.main(
            [
                "--run-dir",
                str(run),
                "--resume",
                "--iterations",
                "4",
                "--dataset",
                "DEMO",
                "--data-dir",
                str(tmp_path / "moved"),
            ]
        )
        == 0
    )
    results = json.loads((run / "results.json").read_text())
    assert results["final"]["step"] == 4 and [h["step"] for h in results["history"]] == [2, 4]
    assert results["resumes"] == [
        {
            "step": 2,
            "changes": {"train.iterations": [2, 4], "data.data_dir": [str(tmp_path / "data"), str(tmp_path / "moved")]},
        }
    ]
    assert resolve_config("demo", [run / "config.yaml"]).train.iterations == 4
    assert train.main(["--run-dir", str(run), "--resume", "--iterations", "3"]) == 2
    assert "checkpoint is at step 4, past train.iterations = 3" in one_error_line(capsys)
    assert resolve_config("demo", [run / "config.yaml"]).train.iterations == 4  # config.yaml unchanged


# --------------------------------------------------------------------------- operating-system failures
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_savez, calls = np.savez, []

    def savez(*args, **kwargs):  # the second checkpoint's optimizer file (4th .npz) hits a full disk
        calls.append(1)
        if len(calls) == 4:
            _enospc()
        return real_savez(*args, **kwargs)

    monkeypatch.setattr(np, "savez", savez)
    assert train.main(cli(tiny, tmp_path, "--run-dir", str(run))) == 2
    line = one_error_line(capsys)
    assert "saving the checkpoint of step 60" in line and "no space left" in line
    assert "optimizer.npz" in line and "step 30" in line and "--resume" in line
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 30
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == [
        "state.json",
        "step_00000030.optimizer.npz",
        "step_00000030.weights.npz",
    ]
    assert_no_result(run)
    monkeypatch.setattr(np, "savez", real_savez)
    assert train.main(["--run-dir", str(run), "--resume"]) == 0  # and it continues once there is room


def test_read_only_run_folder_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    import tempfile

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    run = tmp_path / "run"
    assert train.main(cli(tiny, tmp_path, "--run-dir", str(run))) == 2
    line = one_error_line(capsys)
    assert str(run) in line and "read-only" in line


def test_run_dir_naming_a_file(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert train.main(["--dataset", "demo", "--run-dir", str(target)]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    assert target.read_text() == "mine"


@pytest.fixture
def finished_run(tiny, tmp_path):
    run = tmp_path / "run"
    assert (
        train.main(cli(tiny, tmp_path, "--run-dir", str(run), "--iterations", "2", "--set", "train.eval_every=2")) == 0
    )
    return run


def test_corrupt_state_json(finished_run, capsys):
    state = finished_run / "checkpoint" / "state.json"
    state.write_text('{"step": 2, "weights": ')
    assert train.main(["--run-dir", str(finished_run), "--resume", "--iterations", "4"]) == 2
    line = one_error_line(capsys)
    assert f"{state}: corrupt checkpoint state" in line
    assert state.read_text() == '{"step": 2, "weights": '
    assert "iterations: 2\n" in (finished_run / "config.yaml").read_text()  # not rewritten with 4


def test_missing_checkpoint_weights(finished_run, capsys):
    weights = finished_run / "checkpoint" / "step_00000002.weights.npz"
    weights.unlink()
    assert train.main(["--run-dir", str(finished_run), "--resume", "--iterations", "4"]) == 2
    assert f"{weights}: the checkpoint's weights file is missing" in one_error_line(capsys)


def test_disk_full_during_a_cache_build_keeps_the_old_cache(tmp_path, capsys, monkeypatch):
    from msdn_tf.config import DemoConfig
    from msdn_tf.data import cache
    from msdn_tf.data.demo import ensure_demo_file

    source = ensure_demo_file(DemoConfig(**SMALL_DEMO), tmp_path / "d")
    out = cache.ensure_cache(str(source), progress=False, log=lambda m: None).path
    before = open(out, "rb").read()
    os.utime(source, ns=(1, 1))  # the source "changed": the cache is rebuilt, and the disk is full
    monkeypatch.setattr(cache.os, "fsync", _enospc)
    with pytest.raises(OSError) as info:
        cache.ensure_cache(str(source), progress=False, log=lambda m: None)
    assert info.value.errno == errno.ENOSPC and info.value.filename.startswith(out + ".tmp-")
    assert open(out, "rb").read() == before
    assert not [p for p in os.listdir(os.path.dirname(out)) if ".tmp-" in p]


def test_stale_cache_temporaries_of_killed_builds_are_removed(tmp_path):
    from msdn_tf.data.cache import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache_path = str(tmp_path / "f.regions_float16.npy")
    stale = f"{cache_path}.tmp-{dead.pid}"
    running = f"{cache_path}.tmp-{os.getppid()}"  # a live process: another build right now
    for path in (stale, running):
        open(path, "wb").write(b"x" * 10)
    lines = []
    assert remove_stale_temporaries(cache_path, lines.append) == [stale]
    assert not os.path.exists(stale) and os.path.exists(running)
    assert any("removed" in line and str(dead.pid) in line for line in lines)
    assert any("left alone" in line for line in lines)


def test_nan_in_the_source_of_a_cache_names_the_row(tmp_path):
    from msdn_tf.data.cache import write_cache

    x = np.ones((5, 2, 3), np.float32)
    x[3, 1, 2] = np.inf
    with pytest.raises(DataError, match=r"src\.hdf5: feature row\(s\) \[3\] hold NaN or infinite"):
        write_cache(str(tmp_path / "c.npy"), x.shape, lambda a, b: x[a:b], progress=False, source={"path": "src.hdf5"})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- smaller messages
def test_dataset_names_are_case_insensitive(capsys):
    assert train.main(["--dataset", "CUB", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "dataset: cub" in printed and "iterations: 4234" in printed
    assert train.main(["--dataset", "CUB"]) == 2
    assert "--dataset cub needs --data-dir" in one_error_line(capsys)


def test_data_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file.hdf5"
    f.write_text("x")
    for dataset in ("cub", "demo", "custom"):
        assert train.main(["--dataset", dataset, "--data-dir", str(f)]) == 2
        assert "is a file, not a directory" in one_error_line(capsys)


def test_nan_word_vector_names_the_file_and_the_attribute(tmp_path):
    from msdn_tf.data.wordvectors import attribute_vectors

    vectors = tmp_path / "vectors.txt"
    vectors.write_text("red 1 0 0\nwing nan 1 0\nbeak 0 0 1\n")
    with pytest.raises(DataError, match=r"vectors\.txt: line 2: the vector of 'wing' holds NaN.*'red wing'"):
        attribute_vectors(["red wing", "beak"], str(vectors))


def test_nan_attribute_vector_file_names_the_attribute(tmp_path):
    from msdn_tf.data.custom import read_attribute_vectors_file

    path = tmp_path / "vec.npy"
    np.save(path, np.array([[1.0, 0.0], [np.nan, 1.0]]))
    with pytest.raises(DataError, match=r"vec\.npy: the vector\(s\) of attribute\(s\) .*beak.* hold NaN"):
        read_attribute_vectors_file(path, ["wing", "beak"])


def test_resume_purges_tensorboard_events_past_the_checkpoint(tiny, tmp_path):
    import tensorflow as tf

    config = tiny_config(tiny, tmp_path)

    class Interrupt(Exception):
        pass

    def stop_at_60(step, **kwargs):
        if step == 60:
            raise Interrupt()

    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_training(config, run_dir=run, log=lambda *a: None, eval_hooks=[stop_at_60])
    # what the interrupted session had flushed past its checkpoint (step 30)
    writer = tf.summary.create_file_writer(str(run))
    with writer.as_default():
        tf.summary.scalar("eval/H", -1.0, step=60)
        tf.summary.scalar("train/loss", -1.0, step=40)
    writer.close()
    assert train.main(["--run-dir", str(run), "--resume"]) == 0
    seen = {}
    for path in run.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":  # the run's config, once
                    continue
                seen.setdefault((v.tag, event.step), []).append(float(tf.make_ndarray(v.tensor)))
    assert len(seen[("eval/H", 60)]) == 1 and seen[("eval/H", 60)][0] >= 0
    assert len(seen[("train/loss", 40)]) == 1 and seen[("train/loss", 40)][0] >= 0
    assert len(seen[("eval/H", 30)]) == 1


def test_os_errors_read_as_one_line_with_the_path():
    from msdn_tf.errors import describe_os_error

    line = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "runs/x/model.keras"))
    assert line.startswith("runs/x/model.keras: no space left on the device")
    h5py_style = OSError(
        "Unable to synchronously create file (unable to open file: name = '/d/f.hdf5.tmp-7', "
        "errno = 30, error message = 'Read-only file system', flags = 13)\nsecond line"
    )
    line = describe_os_error(h5py_style)
    assert line.startswith("/d/f.hdf5.tmp-7: the file system is read-only") and "\n" not in line
    h5py_style.errno = errno.EROFS  # some h5py errors carry the errno but not the file name
    assert describe_os_error(h5py_style).startswith("/d/f.hdf5.tmp-7: the file system is read-only")


def test_checkpoints_with_keras_h5_weights_still_resume(finished_run):
    import keras

    ckpt = finished_run / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    model = keras.models.load_model(finished_run / "model.keras")  # the weights of step 2
    model.save_weights(ckpt / "step_00000002.weights.h5")  # the format before .npz
    (ckpt / state["weights"]).unlink()
    state["weights"] = "step_00000002.weights.h5"
    (ckpt / "state.json").write_text(json.dumps(state))
    assert train.main(["--run-dir", str(finished_run), "--resume", "--iterations", "4"]) == 0
    assert json.loads((finished_run / "results.json").read_text())["final"]["step"] == 4
