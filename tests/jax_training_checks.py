"""Training on the JAX backend. Not collected on its own (no ``test_`` prefix):
``tests/test_jax_backend.py`` runs this file with ``KERAS_BACKEND=jax`` in a
subprocess, after writing TensorFlow's results for the same steps into
``$MSDN_JAX_CHECKS_DIR``.

* 20 steps of the tiny demo from the same initial weights and batches give the
  weights TensorFlow gives, within 1e-4 relative: with ``fit`` (host batches) and
  with the on-device loop (:mod:`msdn_tf.training.jax_loop`, two periods of 12 and
  8 steps in two dispatches), which also equals ``fit`` on JAX exactly;
* the on-device loop stops at a NaN input row and names the step and the row;
* ``run_training`` trains, evaluates, checkpoints, resumes (bit-identical to an
  uninterrupted run) and writes the run directory TensorFlow writes; its
  predictions go to ``jax_predictions.npz`` for the TensorFlow side to compare
  with ``model.keras`` loaded there;
* ``--strategy mirrored`` is a clear error.

The demo batches come from the tf.data pipeline, so TensorFlow is importable here.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from msdn_tf.cli import train
from msdn_tf.config import resolve_config
from msdn_tf.training.loop import build_model_from_config, run_training
from tests.helpers import TINY

CHECKS_DIR_ENV = "MSDN_JAX_CHECKS_DIR"
STEPS = 20
TOL = 1e-4  # relative, as tests/test_trajectory.py
PREDICTED_ROWS = 24


def tiny_config(workdir, *overrides):
    """The tiny demo of tests/test_train.py, its data under ``workdir/data``."""
    path = Path(workdir) / "tiny.yaml"
    if not path.exists():
        path.write_text(TINY)
    return resolve_config("demo", [path], [f"data.data_dir={Path(workdir) / 'data'}", *overrides])


def demo_steps(workdir, steps=STEPS, device_loop=False):
    """``(initial, final)`` trainable weights by name around ``steps`` ``fit`` steps on the tiny demo.

    The model and optimizer are ``run_training``'s (:func:`msdn_tf.build_model_from_config`),
    the batches its tf.data pipeline's. The one random initial weight, ``W_1``, is
    drawn by NumPy, so every backend starts from the same weights.
    """
    from msdn_tf.data.pipeline import make_sampler, train_dataset
    from msdn_tf.data.registry import load_dataset

    config = tiny_config(workdir)
    data = load_dataset(config)
    model = build_model_from_config(config, data)
    model.a2v.W_1.assign(np.random.default_rng(0).normal(size=model.a2v.W_1.shape).astype("float32"))
    initial = {w.name: np.array(w) for w in model.trainable_weights}
    sampler = make_sampler(data, config.data.sampler, config.data.batch_size, config.train.seed)
    if device_loop:  # JAX: the training loop with the rows on the device, two periods
        from msdn_tf.training.jax_loop import DeviceLoop

        loop = DeviceLoop(model, data, sampler, max_steps=12)
        loop.train(0, 12)
        loop.train(12, steps - 12)
    else:
        model.fit(train_dataset(data, sampler, 0, steps), epochs=1, verbose=0, shuffle=False)
    return initial, {w.name: np.array(w) for w in model.trainable_weights}


def relative_error(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def checks_dir():
    if CHECKS_DIR_ENV not in os.environ:
        pytest.skip(f"run by tests/test_jax_backend.py, which sets {CHECKS_DIR_ENV}")
    import keras

    assert keras.backend.backend() == "jax", "this file checks the JAX backend: run it with KERAS_BACKEND=jax"
    return Path(os.environ[CHECKS_DIR_ENV])


def test_twenty_steps_equal_tensorflow(checks_dir):
    with np.load(checks_dir / "tf_steps.npz") as npz:
        want = {k: npz[k] for k in npz.files}
    initial, final = demo_steps(checks_dir)
    assert sorted(final) == sorted(want) == ["V", "W_1", "W_1_1", "W_2", "W_2_1"]
    for name, value in final.items():
        moved = relative_error(initial[name], want[name])
        assert moved > 50 * TOL, f"{name} barely moved ({moved:.2e}): the comparison would not discriminate"
        err = relative_error(value, want[name])
        assert err < TOL, f"{name}: JAX vs TensorFlow relative error {err:.2e} after {STEPS} steps"


def test_device_loop_equals_tensorflow_and_fit(checks_dir):
    with np.load(checks_dir / "tf_steps.npz") as npz:
        want = {k: npz[k] for k in npz.files}
    _, fit = demo_steps(checks_dir)
    _, final = demo_steps(checks_dir, device_loop=True)
    for name, value in final.items():
        err = relative_error(value, want[name])
        assert err < TOL, f"{name}: JAX device loop vs TensorFlow relative error {err:.2e} after {STEPS} steps"
        np.testing.assert_array_equal(value, fit[name], err_msg=f"{name}: device loop vs fit on JAX")


def test_device_loop_stops_at_a_nan_row_naming_step_and_row(checks_dir):
    from msdn_tf.data.pipeline import make_sampler
    from msdn_tf.data.registry import load_dataset
    from msdn_tf.errors import NonFiniteError

    config = tiny_config(checks_dir, "train.iterations=4", "train.eval_every=2", "data.on_device=true")
    data = load_dataset(config)
    sampler = make_sampler(data, config.data.sampler, config.data.batch_size, config.train.seed)
    row = int(np.setdiff1d(sampler.batch(2), np.concatenate([sampler.batch(0), sampler.batch(1)]))[0])  # step 3 only
    inner = data.features

    class Poisoned:
        shape, path = inner.shape, "poisoned.hdf5"

        def read(self, indices):
            x = np.array(inner.read(indices), dtype=np.float32)
            x[np.asarray(indices) == row] = np.nan
            return x

    data.features = Poisoned()
    run = checks_dir / "jax_nan"
    with pytest.raises(NonFiniteError, match=rf"training step 3:.*poisoned\.hdf5.*row {row}\b"):
        run_training(config, run_dir=run, data=data, log=lambda *a: None)
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not (run / "results.json").exists()


class Interrupt(Exception):
    pass


def test_train_evaluate_checkpoint_resume(checks_dir):
    config = tiny_config(checks_dir, "train.iterations=4", "train.eval_every=2")
    quiet = lambda *a: None
    full = run_training(config, run_dir=checks_dir / "jax_full", log=quiet)
    assert full["backend"] == "jax"
    assert [h["step"] for h in full["history"]] == [0, 2, 4]
    assert set(full["final"]["losses"]) == {"ce_a2v", "cal_a2v", "ce_v2a", "cal_v2a", "distill", "loss"}
    assert all(np.isfinite(v) for v in full["final"]["losses"].values())

    def stop_at_4(step, **kwargs):
        if step == 4:
            raise Interrupt()

    cut = checks_dir / "jax_cut"
    with pytest.raises(Interrupt):
        run_training(config, run_dir=cut, log=quiet, eval_hooks=[stop_at_4])
    assert json.loads((cut / "checkpoint" / "state.json").read_text())["step"] == 2
    assert train.main(["--run-dir", str(cut), "--resume"]) == 0
    resumed = json.loads((cut / "results.json").read_text())
    for key in ("acc", "U", "S", "H", "losses"):
        assert resumed["final"][key] == full["final"][key], key

    # The run directory TensorFlow writes.
    run = checks_dir / "jax_full"
    for name in ("config.yaml", "model.keras", "results.json", "results.md", "checkpoint/state.json"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))

    # Predictions of the saved model, for tests/test_jax_backend.py to compare on TensorFlow.
    from msdn_tf.data.registry import load_dataset
    from msdn_tf.evaluation.predict import predict_logits
    from msdn_tf.evaluation.runs import load_run_model

    data = load_dataset(config)
    rows = np.sort(np.concatenate([data.test_seen_loc, data.test_unseen_loc]))[:PREDICTED_ROWS]
    logits = predict_logits(load_run_model(run), data, rows, batch_size=10)
    np.savez(checks_dir / "jax_predictions.npz", rows=rows, **logits)


def test_tf_distribute_strategy_is_a_clear_error(checks_dir, capsys):
    run = checks_dir / "mirrored"
    argv = [
        "--dataset",
        "demo",
        "--config",
        str(checks_dir / "tiny.yaml"),
        "--data-dir",
        str(checks_dir / "data"),
        "--run-dir",
        str(run),
        "--strategy",
        "mirrored",
    ]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "tf.distribute strategies are TensorFlow-only" in err and "KERAS_BACKEND=tensorflow" in err
    assert not run.exists()
