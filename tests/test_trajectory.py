"""50 training steps equal an independent PyTorch run of the reference equations (docs/reference.md §3-§5).

``tests/fixtures/trajectory_50.npz`` was written once by real PyTorch 2.13 running
``tests/fixtures/make_trajectory_fixture.py`` (float64, ``torch.optim.RMSprop``), from the
same initial weights and the same 50 batches. The margin ``bias = 1`` is in the logits, so
a model that drops it from self-calibration or distillation leaves the trajectory.
"""

import os

import numpy as np
import pytest

from msdn_tf.model import build_msdn
from msdn_tf.optimizers import TorchRMSprop
from tests.helpers import TORCH_FIXTURES

TRAINABLE = ("V", "W_1", "W_2", "W_1_1", "W_2_1")
TOL = 1e-4


@pytest.fixture(scope="module")
def trajectory():
    with np.load(os.path.join(TORCH_FIXTURES, "trajectory_50.npz")) as npz:
        return {k: npz[k] for k in npz.files}


def replay(t, recipe, bias=None):
    """The Keras model and TorchRMSprop on the fixture's batches; returns the final weights."""
    g = lambda k: t[f"{recipe}::{k}"]
    lr, momentum, weight_decay, lam, w_d, normalize_V = g("recipe")
    mask = g("mask_bias")[0]
    model = build_msdn(
        g("att"),
        g("init::V"),
        np.flatnonzero(mask < 0),
        np.flatnonzero(mask > 0),
        feature_dim=g("fmap_bfr").shape[1],
        bias=float(g("bias") if bias is None else bias),
        lambda_cal=float(lam),
        distill_weight=float(w_d),
        normalize_attribute_vectors=bool(normalize_V),
    )
    weights = {
        "V": model.embedding.V,
        "W_1": model.a2v.W_1,
        "W_2": model.a2v.W_2,
        "W_1_1": model.v2a.W_1_1,
        "W_2_1": model.v2a.W_2_1,
    }
    for name, var in weights.items():
        var.assign(g(f"init::{name}").astype("float32"))
    model.compile(
        optimizer=TorchRMSprop(
            learning_rate=float(lr),
            rho=0.99,
            epsilon=1e-8,
            momentum=float(momentum),
            coupled_weight_decay=float(weight_decay),
        )
    )
    features = np.transpose(g("fmap_bfr"), (0, 2, 1)).astype("float32")  # (N, R, F) channel-last
    labels = g("labels").astype("int32")
    for idx in g("batches"):
        model.train_on_batch(features[idx], labels[idx])
    return {name: np.asarray(var) for name, var in weights.items()}


def relative_error(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("recipe", ["cub", "awa2"])
def test_fifty_steps_equal_the_torch_reference(trajectory, recipe):
    final = replay(trajectory, recipe)
    for name in TRAINABLE:
        want = trajectory[f"{recipe}::final::{name}"]
        moved = relative_error(trajectory[f"{recipe}::init::{name}"], want)
        assert moved > 50 * TOL, f"{name} barely moved ({moved:.2e}): the comparison would not discriminate"
        err = relative_error(final[name], want)
        assert err < TOL, f"{recipe} {name}: relative error {err:.2e} after 50 steps"


def test_a_margin_free_model_leaves_the_trajectory(trajectory):
    """The check discriminates: bias 0 (the old default) ends far from the reference."""
    final = replay(trajectory, "cub", bias=0.0)
    worst = max(relative_error(final[n], trajectory[f"cub::final::{n}"]) for n in TRAINABLE)
    assert worst > 100 * TOL
