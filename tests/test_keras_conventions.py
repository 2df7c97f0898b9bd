"""MSDN behaves as a Keras user expects of a keras.Model (issue 23 §2).

``compile(loss=...)`` is refused with a pointer to the config; ``compile(metrics=...)`` is
honoured by ``fit`` and ``evaluate``; the internal ``nonfinite`` check is not a metric;
``predict`` takes both feature layouts in any order, also on a loaded model; ``summary()``
shows shapes and a loaded model can be ``build()``-ed.
"""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from msdn_tf.model import MSDN, build_msdn  # noqa: E402
from msdn_tf.optimizers import TorchRMSprop  # noqa: E402

C, K, D, F, UNSEEN = 6, 5, 4, 8, [4, 5]


@pytest.fixture
def model():
    rng = np.random.default_rng(0)
    return build_msdn(rng.random((C, K)), rng.normal(size=(K, D)), [0, 1, 2, 3], UNSEEN, feature_dim=F, seed=1)


def _data(n=12, R=9, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, R, F)).astype("float32"), rng.integers(0, C, size=n)


@pytest.mark.parametrize("kwargs", [{"loss": "mse"}, {"loss_weights": [1.0]}])
def test_compile_refuses_a_loss_and_points_to_the_config(model, kwargs):
    with pytest.raises(ValueError, match=r"own loss.*loss\.lambda_cal"):
        model.compile(optimizer=TorchRMSprop(1e-4), **kwargs)


def test_compile_refuses_a_metrics_dict_naming_another_output(model):
    with pytest.raises(ValueError, match="logits_a2v"):
        model.compile(optimizer=TorchRMSprop(1e-4), metrics={"scores": ["accuracy"]})


@pytest.mark.slow
def test_compile_metrics_are_reported_by_fit_and_evaluate_and_nonfinite_is_not(model, capsys):
    x, y = _data()
    model.compile(optimizer=TorchRMSprop(1e-4), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=1)
    assert "accuracy" in history.history and "nonfinite" not in history.history
    assert "nonfinite" not in capsys.readouterr().out
    results = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    logits = model.predict(x, batch_size=4, verbose=0)["logits"]
    assert "nonfinite" not in results and {"loss", "ce_a2v", "distill"} <= set(results)
    assert results["accuracy"] == pytest.approx(np.mean(np.argmax(logits, axis=1) == y), abs=1e-6)
    assert model.trackers["nonfinite"] in model.metrics  # the guard's counter is still kept


def test_a_metrics_dict_names_the_sub_net_logits(model):
    x, y = _data()
    model.compile(
        optimizer=TorchRMSprop(1e-4),
        metrics={"logits_a2v": ["accuracy"], "logits_v2a": [keras.metrics.SparseTopKCategoricalAccuracy(k=2)]},
    )
    results = model.evaluate(x, y, batch_size=6, verbose=0, return_dict=True)
    out = model.predict(x, verbose=0)
    assert results["logits_a2v_accuracy"] == pytest.approx(np.mean(np.argmax(out["logits_a2v"], 1) == y), abs=1e-6)
    top2 = np.argsort(-out["logits_v2a"], axis=1)[:, :2]
    assert results["logits_v2a_sparse_top_k_categorical_accuracy"] == pytest.approx(
        np.mean([y[i] in top2[i] for i in range(len(y))]), abs=1e-6
    )


def test_a_loaded_model_predicts_both_layouts_in_any_order(model, tmp_path):
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x3, _ = _data(n=5)
    x4 = x3.reshape(5, 3, 3, F)
    expected = keras.ops.convert_to_numpy(model(x3)["logits"])
    for m in (model, loaded):
        for x in (x3, x4, x3, x4):
            np.testing.assert_allclose(m.predict(x, verbose=0)["logits"], expected, rtol=1e-5, atol=1e-6)
    loaded.compile(optimizer=TorchRMSprop(1e-4))
    y = np.zeros(5, "int64")
    assert loaded.evaluate(x4, y, verbose=0) is not None and loaded.evaluate(x3, y, verbose=0) is not None


def test_summary_shows_shapes_and_a_loaded_model_builds(model, tmp_path, capsys):
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for m in (model, loaded):
        m.summary()
        text = capsys.readouterr().out
        assert "?" not in text
        assert f"({K}, {D})" in text and f"scores: (None, {K})" in text and f"attention: (None, {K}," in text
    weights = [w.numpy().copy() for w in loaded.weights]
    loaded.build((None, 9, F))
    loaded.build((None, 3, 3, F))
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(weights, loaded.weights))
    with pytest.raises(ValueError, match=rf"\(batch, regions, {F}\)"):
        loaded.build((None, 9, F + 1))
    fresh = MSDN.from_config(model.get_config())
    fresh.build((None, 3, 3, F))
    assert [w.path for w in fresh.weights] == [w.path for w in model.weights]
