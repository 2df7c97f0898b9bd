"""TorchRMSprop against the torch.optim.RMSprop update rule computed by hand (§5)."""

import json

import keras
import numpy as np
import pytest

from msdn_tf.optimizers import TorchRMSprop
from tests.reference_numpy import torch_rmsprop_step


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_steps_match_torch_rule(rng, momentum):
    w0 = rng.normal(size=(3, 4))
    grads = [rng.normal(size=(3, 4)) for _ in range(3)]
    var = keras.Variable(w0.astype("float32"))
    opt = TorchRMSprop(learning_rate=1e-2, momentum=momentum)
    state, w = {}, w0.copy()
    for g in grads:
        opt.apply([g.astype("float32")], [var])
        w = torch_rmsprop_step(w, g, state, lr=1e-2, momentum=momentum)
        np.testing.assert_allclose(np.asarray(var), w, rtol=1e-5, atol=1e-7)


def test_first_step_by_hand():
    # g = 0.5 + 1e-4 * 1.0; v = 0.01 * g^2; step = g / (sqrt(v) + 1e-8) = ~10; w = 1 - 1e-4 * 10.
    var = keras.Variable(np.array([1.0], "float32"))
    TorchRMSprop().apply([np.array([0.5], "float32")], [var])
    g = 0.5 + 1e-4
    expected = 1.0 - 1e-4 * g / (np.sqrt(0.01 * g * g) + 1e-8)
    np.testing.assert_allclose(np.asarray(var), [expected], rtol=1e-6)


def test_differs_from_keras_rmsprop():
    a = keras.Variable(np.array([1.0], "float32"))
    b = keras.Variable(np.array([1.0], "float32"))
    TorchRMSprop(learning_rate=0.1, momentum=0.0, coupled_weight_decay=0.0).apply([np.array([1e-5], "float32")], [a])
    keras.optimizers.RMSprop(learning_rate=0.1, rho=0.99).apply([np.array([1e-5], "float32")], [b])
    assert abs(float(a[0]) - float(b[0])) > 1e-3  # eps placement matters for small gradients


def test_config_round_trip_and_refuses_decoupled_decay():
    opt = TorchRMSprop(learning_rate=3e-4, rho=0.95, epsilon=1e-7, momentum=0.5, coupled_weight_decay=1e-3)
    config = json.loads(json.dumps(opt.get_config()))
    clone = TorchRMSprop.from_config(config)
    assert clone.get_config() == opt.get_config()
    assert clone.coupled_weight_decay == 1e-3 and clone.rho == 0.95
    with pytest.raises(ValueError, match="coupled_weight_decay"):
        TorchRMSprop(weight_decay=0.1)
