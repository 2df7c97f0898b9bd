"""MultiWorkerMirroredStrategy across processes: 2 workers on 127.0.0.1 with TF_CONFIG.

One test starts two `python -m msdn_tf.train --strategy multi_worker` processes and
checks the trained weights against a single-process run with the same global batch,
that only the chief writes, and that killing a worker stops the other with a clear
message after which `--resume` on both continues to the same weights. The others
check the input split and the TF_CONFIG errors without starting a cluster.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from msdn_tf.config import resolve_config
from msdn_tf.distribute import parse_tf_config
from msdn_tf.errors import ConfigError
from tests.helpers import write_tiny_yaml

REPO = Path(__file__).resolve().parent.parent


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_config(ports, index):
    return json.dumps(
        {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
    )


@pytest.fixture
def tiny(tmp_path):
    path = write_tiny_yaml(tmp_path, iterations=30, eval_every=3, eval_initial=False, worker_timeout=30)
    config = resolve_config("demo", [path], [f"data.data_dir={tmp_path / 'data'}"])
    from msdn_tf.data.registry import load_dataset

    return {"path": path, "config": config, "data": load_dataset(config)}  # generates the data once


def start_worker(tiny, tmp_path, ports, index, run_dir, *extra, tmp=None):
    tmp = tmp_path / (tmp or f"tmp{index}")
    tmp.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        CUDA_VISIBLE_DEVICES="",
        TF_CONFIG=tf_config(ports, index),
        TMPDIR=str(tmp),
    )
    argv = (
        ["--run-dir", str(run_dir), *extra]
        if "--resume" in extra
        else [
            "--dataset",
            "demo",
            "--config",
            str(tiny["path"]),
            "--data-dir",
            str(tmp_path / "data"),
            "--strategy",
            "multi_worker",
            "--run-dir",
            str(run_dir),
            *extra,
        ]
    )
    return subprocess.Popen(
        [sys.executable, "-m", "msdn_tf.train", *argv],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def weights(run_dir):
    import keras

    model = keras.models.load_model(Path(run_dir) / "model.keras", compile=False)
    # Paths without the model's own name (msdn, msdn_1, ... depending on what the process built before).
    return {w.path.split("/", 1)[-1]: np.asarray(w) for w in model.weights}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_after_a_killed_worker(tiny, tmp_path):
    import shutil

    from msdn_tf.training.loop import run_training

    single = run_training(tiny["config"], run_dir=tmp_path / "single", data=tiny["data"], log=lambda *a: None)

    # 1. Two workers; worker 1 gets its own --run-dir (as on another machine) and must write nothing there.
    ports = free_ports(2)
    chief_dir, other_dir = tmp_path / "chief", tmp_path / "other"
    procs = [start_worker(tiny, tmp_path, ports, 0, chief_dir), start_worker(tiny, tmp_path, ports, 1, other_dir)]
    state = chief_dir / "checkpoint" / "state.json"
    deadline = time.time() + 180
    while not state.exists() and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.02)
    # 2. Kill worker 1 after the first checkpoint: worker 0 stops with a clear message.
    procs[1].send_signal(signal.SIGKILL)
    out1, _ = procs[1].communicate()
    out0, err0 = procs[0].communicate(timeout=120)
    assert "not the chief" in out1
    assert not other_dir.exists()  # the non-chief wrote nothing in its --run-dir
    if procs[0].returncode == 0:  # the chief finished before the kill landed: compare, skip the resume part
        assert_same_weights(weights(chief_dir), weights(tmp_path / "single"))
        pytest.skip("the chief finished before worker 1 was killed; resume not exercised")
    step = json.loads(state.read_text())["step"]
    assert 0 < step < 30 and not (chief_dir / "model.keras").exists()
    assert "Restart EVERY worker" in err0 and "--resume" in err0, err0[-3000:]

    # 3. Both resume; worker 1 from a copy of the chief's run directory (no shared file system).
    shutil.copytree(chief_dir, other_dir)
    ports = free_ports(2)
    procs = [
        start_worker(tiny, tmp_path, ports, 0, chief_dir, "--resume", tmp="tmp0b"),
        start_worker(tiny, tmp_path, ports, 1, other_dir, "--resume", tmp="tmp1b"),
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert f"resumed at step {step}" in outs[0][0] and f"resumed at step {step}" in outs[1][0]
    assert_same_weights(weights(chief_dir), weights(tmp_path / "single"))
    chief = json.loads((chief_dir / "results.json").read_text())
    assert chief["strategy"] == {"name": "multi_worker", "replicas": 2, "workers": 2}
    for key in ("acc", "U", "S", "H"):
        assert chief["final"][key] == pytest.approx(single["final"][key], abs=1e-6)
    assert chief["final"]["losses"]["loss"] == pytest.approx(single["final"]["losses"]["loss"], rel=1e-4)
    assert sorted(p.name for p in chief_dir.iterdir() if not p.name.startswith("events.out.tfevents.")) == [
        "checkpoint",
        "class_semantics.json",
        "config.yaml",
        "model.keras",
        "results.json",
        "results.md",
    ]
    assert list(chief_dir.glob("events.out.tfevents.*"))  # TensorBoard events, named after the run folder
    assert not (other_dir / "model.keras").exists() and not (other_dir / "results.json").exists()
    assert list((tmp_path / "tmp1b").iterdir()) == []  # worker 1 removed its temporary folder


def test_workers_draw_disjoint_slices_that_make_up_the_global_batch(tiny):
    from msdn_tf.data.device import DeviceFeatures, device_train_dataset
    from msdn_tf.data.pipeline import make_sampler, train_dataset

    data, config = tiny["data"], tiny["config"]
    sampler = make_sampler(data, config.data.sampler, 16, config.train.seed)
    store = DeviceFeatures(data.features, data.trainval_loc)
    for make in (
        lambda **kw: train_dataset(data, sampler, 5, 3, **kw),
        lambda **kw: device_train_dataset(store, data.labels, sampler, 5, 3, **kw),
    ):
        whole = [(np.asarray(x), np.asarray(y)) for x, y in make()]
        parts = [[(np.asarray(x), np.asarray(y)) for x, y in make(shard=([i], 2))] for i in (0, 1)]
        for step, (x, y) in enumerate(whole):
            assert [p[step][1].shape[0] for p in parts] == [8, 8]
            np.testing.assert_array_equal(np.concatenate([p[step][0] for p in parts]), x)
            np.testing.assert_array_equal(np.concatenate([p[step][1] for p in parts]), y)
        # a worker with two local replicas yields both of its slices, in order
        both = [np.asarray(y) for _, y in make(shard=([0, 1], 2))]
        np.testing.assert_array_equal(np.concatenate(both), np.concatenate([y for _, y in whole]))
    rows = [sampler.batch(5)[i * 8 : (i + 1) * 8] for i in (0, 1)]
    assert not set(rows[0]) & set(rows[1]) or len(set(sampler.batch(5))) < 16  # disjoint positions


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG needs a "cluster" mapping'),
        (
            '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 2}}',
            r"TF_CONFIG task.index = 2 is out of range: cluster.worker has 2 address\(es\), "
            r"so the index must lie in 0..1",
        ),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": -1}}', "out of range"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}', "TF_CONFIG task.type = 'ps'"),
        (
            '{"cluster": {"worker": ["127.0.0.1"]}, "task": {"type": "worker", "index": 0}}',
            r"TF_CONFIG cluster.worker\[0\] = '127.0.0.1': expected 'host:port'",
        ),
        ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}', "appears twice"),
        (
            '{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}',
            "TF_CONFIG cluster.ps",
        ),
        ('{"cluster": {"worker": ["a:1"]}}', 'TF_CONFIG needs a "task" mapping'),
    ],
)
def test_malformed_tf_config_names_the_setting(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_tf_config(text)


def test_tf_config_roles():
    info = parse_tf_config('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}')
    assert (info.is_chief, info.rank, info.num_workers, info.address) == (False, 1, 2, "b:2")
    info = parse_tf_config('{"cluster": {"chief": ["c:3"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}')
    assert (info.is_chief, info.rank, info.num_workers) == (False, 1, 2)
    assert parse_tf_config(None).is_chief


@pytest.mark.slow
def test_cli_errors_for_bad_tf_config_and_unreachable_worker(tiny, tmp_path):
    base = [
        sys.executable,
        "-m",
        "msdn_tf.train",
        "--dataset",
        "demo",
        "--config",
        str(tiny["path"]),
        "--data-dir",
        str(tmp_path / "data"),
        "--strategy",
        "multi_worker",
    ]
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        CUDA_VISIBLE_DEVICES="",
        TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 5}}',
    )
    proc = subprocess.run(
        base + ["--run-dir", str(tmp_path / "bad")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "TF_CONFIG task.index = 5 is out of range" in proc.stderr
    assert not (tmp_path / "bad").exists()

    port, dead = free_ports(2)
    env["TF_CONFIG"] = tf_config([port, dead], 0)
    started = time.time()
    proc = subprocess.run(
        base + ["--run-dir", str(tmp_path / "alone"), "--set", "train.worker_timeout=3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert (
        f"did not reach every other worker (worker[1] 127.0.0.1:{dead}) within train.worker_timeout = 3 s"
        in proc.stderr
    )
    assert time.time() - started < 60
