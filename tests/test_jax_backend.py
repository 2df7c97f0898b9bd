"""The JAX backend (issue 17), checked from this TensorFlow test process.

Keras fixes its backend at import, so the JAX side runs in two pytest
subprocesses with ``KERAS_BACKEND=jax``, started together:

* without TensorFlow (a ``tensorflow`` package that raises on import comes first
  on ``PYTHONPATH``): the backend-neutral tests of the forward pass, every loss
  term, the optimizer and the 50-step torch trajectory (``test_model.py``,
  ``test_optimizers.py``, ``test_trajectory.py``, the same tolerances as on
  TensorFlow) and ``jax_no_tensorflow_checks.py`` (the benchmark,
  ``stateless_apply``, the distillation gradient);
* with TensorFlow importable (the tf.data input pipeline):
  ``jax_training_checks.py`` (20 steps equal TensorFlow's, ``run_training`` with
  checkpoint and resume, the strategy error).

This process computes TensorFlow's side of the 20-step comparison first and,
after the subprocess, loads the JAX run's ``model.keras`` and compares its
predictions with JAX's.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # two subprocesses, about a minute

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("jax") is None:  # found, not imported: this process stays TensorFlow-only
    pytest.skip("JAX is not installed: pip install -e '.[dev]' (or '.[jax]')", allow_module_level=True)

# Model tests that are TensorFlow-specific by construction (tf.GradientTape); their JAX
# counterpart is in jax_no_tensorflow_checks.py.
TF_ONLY = ["tests/test_model.py::test_identical_logits_give_zero_distillation_without_nan"]
NEUTRAL_TESTS = [
    "tests/test_model.py",
    "tests/test_optimizers.py",
    "tests/test_trajectory.py",
    "tests/jax_no_tensorflow_checks.py",
]
TRAINING_TESTS = ["tests/jax_training_checks.py"]
TIMEOUT_S = 900


def _pytest_subprocess(files, log, env_extra, deselect=()):
    """``pytest files`` on JAX (CPU), its output to the file ``log``."""
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", **env_extra)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *files]
    for node in deselect:
        cmd += ["--deselect", node]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def jax_runs(tmp_path_factory):
    """Start both JAX subprocesses (after writing TensorFlow's 20 steps), wait, return their outputs."""
    from tests.jax_training_checks import demo_steps

    checks = tmp_path_factory.mktemp("jax_checks")
    _, final = demo_steps(checks)  # TensorFlow; also generates the demo data the JAX side reads
    np.savez(checks / "tf_steps.npz", **final)

    shim = tmp_path_factory.mktemp("no_tensorflow")
    (shim / "tensorflow").mkdir()
    (shim / "tensorflow" / "__init__.py").write_text(
        'raise ImportError("tensorflow is made unimportable by tests/test_jax_backend.py")\n'
    )
    pythonpath = os.pathsep.join([str(shim), str(REPO)])
    logs = {name: checks / f"{name}.log" for name in ("neutral", "training")}
    procs = {
        "neutral": _pytest_subprocess(NEUTRAL_TESTS, logs["neutral"], {"PYTHONPATH": pythonpath}, TF_ONLY),
        "training": _pytest_subprocess(TRAINING_TESTS, logs["training"], {"MSDN_JAX_CHECKS_DIR": str(checks)}),
    }
    outputs = {}
    for name, proc in procs.items():
        proc.wait(timeout=TIMEOUT_S)
        outputs[name] = (logs[name].read_text(), proc.returncode)
    return {"checks": checks, "outputs": outputs}


def _assert_all_passed(output, returncode, at_least):
    """Every collected test passed (none failed, errored or skipped), and there were ``at_least``."""
    assert returncode == 0, output[-6000:]
    summary = output.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= at_least, output[-3000:]
    assert not re.search(r"\d+ (failed|skipped|errors?|xfailed)", summary), output[-3000:]


def test_model_losses_optimizer_and_bench_on_jax_without_tensorflow(jax_runs):
    output, rc = jax_runs["outputs"]["neutral"]
    _assert_all_passed(output, rc, at_least=25)  # forward, every loss term, optimizer, trajectory, bench
    assert "1 deselected" in output


def test_training_on_jax_equals_tensorflow_and_its_model_loads_here(jax_runs):
    output, rc = jax_runs["outputs"]["training"]
    _assert_all_passed(output, rc, at_least=3)

    # Weights are backend-neutral: model.keras written on JAX predicts the same on TensorFlow
    # (the model msdn_tf.export exports).
    from msdn_tf.data.registry import load_dataset
    from msdn_tf.evaluation.predict import LOGIT_KEYS, predict_logits
    from msdn_tf.evaluation.runs import load_run
    from tests.jax_training_checks import tiny_config

    checks = jax_runs["checks"]
    config, model = load_run(checks / "jax_full")
    data = load_dataset(tiny_config(checks))
    with np.load(checks / "jax_predictions.npz") as jax_logits:
        logits = predict_logits(model, data, jax_logits["rows"], batch_size=10)
        for key in LOGIT_KEYS:
            np.testing.assert_allclose(logits[key], jax_logits[key], rtol=1e-5, atol=1e-5)
    assert config.train.iterations == 4


def test_unknown_or_missing_backend_is_a_clear_error(monkeypatch):
    from msdn_tf import backend

    monkeypatch.delitem(sys.modules, "keras")  # as before Keras is imported (restored afterwards)
    monkeypatch.setenv("KERAS_BACKEND", "nope")
    with pytest.raises(
        backend.BackendError, match="KERAS_BACKEND=nope: msdn-tf runs on the Keras backends tensorflow and jax"
    ):
        backend.check_backend()
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    real_find_spec = backend.importlib.util.find_spec
    monkeypatch.setattr(
        backend.importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real_find_spec(name, *a)
    )
    with pytest.raises(backend.BackendError, match=r"KERAS_BACKEND=jax .* 'jax' is not installed.*pip install"):
        backend.check_backend()
    monkeypatch.setenv("KERAS_BACKEND", "")  # empty: Keras falls back to keras.json / its default
    monkeypatch.setenv("KERAS_HOME", str(REPO / "no-such-keras-home"))
    assert backend.check_backend() == "tensorflow"


def test_command_with_an_unknown_backend_exits_with_a_message():
    env = dict(os.environ, KERAS_BACKEND="torch")
    proc = subprocess.run(
        [sys.executable, "-m", "msdn_tf.train", "--dataset", "demo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: KERAS_BACKEND=torch: msdn-tf runs on the Keras backends")
    assert "Traceback" not in proc.stderr
