"""The JAX backend where TensorFlow cannot be imported. Not collected on its own (no
``test_`` prefix): ``tests/test_jax_backend.py`` runs it with ``KERAS_BACKEND=jax``
and a ``tensorflow`` package that raises on import placed first on ``PYTHONPATH``,
together with the backend-neutral model, optimizer and trajectory tests.

* the package, the model, the JAX training step and the benchmark import and run;
* ``TorchRMSprop.stateless_apply`` (what the JAX training step calls) follows the
  torch rule, as ``apply`` does;
* the distillation gradient at identical logits is finite under ``jax.grad`` too.
"""

import json
import sys

import numpy as np
import pytest

from tests.reference_numpy import torch_rmsprop_step


@pytest.fixture(autouse=True, scope="module")
def jax_without_tensorflow():
    import keras

    assert keras.backend.backend() == "jax", "run with KERAS_BACKEND=jax"
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401
    yield
    # Nothing below (nor the model tests run with this file) got TensorFlow in.
    assert sys.modules.get("tensorflow") is None


def test_bench_prints_the_same_json_naming_the_backend(tmp_path, capsys):
    from msdn_tf.cli import bench
    from tests.helpers import BENCH_TINY_ARGS as TINY

    out = tmp_path / "bench.json"
    assert bench.main(TINY[:1] + ["4"] + TINY[3:] + ["--json", str(out)]) == 0  # --regions 4 only
    assert "fused:jit:float32" in capsys.readouterr().out  # the short table
    printed = json.loads(out.read_text())
    assert printed["machine"]["backend"] == "jax" and printed["machine"]["devices"]
    assert printed["config"]["variants"] == ["fused:jit:float32"]  # JAX always jits, as in training
    entry = printed["shapes"][0]["variants"]["fused:jit:float32"]
    for mode in ("train", "eval"):
        assert entry[mode]["fraction_of_limit_median"] > 0 and np.isfinite(entry[mode]["step_s_median"])
    assert "jax.numpy.matmul" in printed["shapes"][0]["limit_note"]
    assert printed["config"]["steps_per_dispatch"] == 20  # the on-device loop's multi-step dispatch
    assert bench.main(TINY + ["--variants", "fused:nojit"]) == 2
    assert "jax.jit" in capsys.readouterr().err


def test_the_gpu_bench_command_runs(capsys):
    # docs/performance.md's GPU command (float32 and bfloat16, many steps per dispatch) at tiny shapes.
    from msdn_tf.cli import bench
    from tests.helpers import BENCH_TINY_ARGS as TINY

    argv = (
        TINY[:1]
        + ["4"]
        + TINY[3:]
        + ["--variants", "fused:jit", "fused:jit:mixed_bfloat16", "--loop-steps", "5", "--json"]
    )
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    entry = report["shapes"][0]["variants"]["fused:jit:mixed_bfloat16"]
    assert report["config"]["steps_per_dispatch"] == 5 and entry["vs_float32"]["train"] > 0


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_stateless_apply_follows_the_torch_rule(rng, momentum):
    import keras

    from msdn_tf.optimizers import TorchRMSprop

    w0 = rng.normal(size=(3, 4))
    grads = [rng.normal(size=(3, 4)) for _ in range(3)]
    var = keras.Variable(w0.astype("float32"))
    opt = TorchRMSprop(learning_rate=0.01, momentum=momentum)
    opt.build([var])
    values, opt_values = [var.value], [v.value for v in opt.variables]
    want, state = w0, {}
    for g in grads:
        values, opt_values = opt.stateless_apply(opt_values, [keras.ops.convert_to_tensor(g.astype("float32"))], values)
        want = torch_rmsprop_step(want, g, state, lr=0.01, momentum=momentum)
        np.testing.assert_allclose(np.asarray(values[0]), want, rtol=1e-5, atol=1e-7)


def test_distillation_gradient_is_finite_at_identical_logits():
    import jax

    from msdn_tf import losses as L

    S = np.ones((2, 3), "float32")
    value, grad = jax.value_and_grad(lambda s: L.cubic_logit_distance(s, s))(S)  # as the TensorFlow test
    assert float(value) == 0.0
    assert np.all(np.isfinite(np.asarray(grad)))
