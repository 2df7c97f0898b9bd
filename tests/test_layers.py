"""The Keras layer contract for every MSDN layer, and .keras save/load of the whole model."""

import json

import keras
import numpy as np
import pytest

from msdn_tf.layers import AttributeEmbedding, AttributeToVisual, VisualToAttribute
from msdn_tf.model import MSDN, build_msdn
from tests.layer_test_helper import run_layer_test


@pytest.fixture
def inputs(rng):
    return [rng.random((2, 5, 8)).astype("float32"), rng.normal(size=(3, 4)).astype("float32")]


def test_attribute_to_visual_contract(inputs, tmp_path):
    out = run_layer_test(
        AttributeToVisual,
        {"feature_dim": 8, "embed_dim": 4, "seed": 1},
        inputs,
        ["W_1", "W_2"],
        tmp_path,
        call_kwargs={"return_features": True},
    )
    assert out["scores"].shape == (2, 3) and out["attention"].shape == (2, 3, 5)
    assert out["features"].shape == (2, 3, 8)
    np.testing.assert_allclose(np.asarray(out["attention"]).sum(axis=-1), 1.0, rtol=1e-6)


def test_attribute_to_visual_uniform_contract(inputs, tmp_path):
    run_layer_test(
        AttributeToVisual, {"feature_dim": 8, "embed_dim": 4, "attention": "uniform"}, inputs, ["W_1", "W_2"], tmp_path
    )


def test_visual_to_attribute_contract(inputs, tmp_path):
    init = {
        "feature_dim": 8,
        "embed_dim": 4,
        "score_initializer": "glorot_uniform",
        "attention_initializer": "glorot_uniform",
    }
    out = run_layer_test(
        VisualToAttribute, init, inputs, ["W_1_1", "W_2_1"], tmp_path, call_kwargs={"return_features": True}
    )
    assert out["features"].shape == (2, 5, 4)
    np.testing.assert_allclose(np.asarray(out["attention"]).sum(axis=1), 1.0, rtol=1e-6)


def test_attribute_embedding_contract(rng, tmp_path):
    layer = AttributeEmbedding(
        3, 4, 2, normalize=True, attribute_vectors=rng.normal(size=(3, 4)), class_attributes=rng.random((2, 3))
    )
    V = np.asarray(layer(None))
    assert sorted(w.name for w in layer.weights) == ["V", "att"]
    assert [w.name for w in layer.trainable_weights] == ["V"]
    np.testing.assert_allclose(np.linalg.norm(V, axis=1), 1.0, rtol=1e-6)
    config = json.loads(json.dumps(layer.get_config()))
    clone = AttributeEmbedding.from_config(config)
    assert clone.get_config() == layer.get_config()
    clone.build()
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(np.asarray(clone(None)), V)
    with pytest.raises(ValueError, match="attribute_vectors must have shape"):
        AttributeEmbedding(3, 4, 2, attribute_vectors=np.ones((4, 4)))


def test_model_config_round_trip_and_keras_file(rng, tmp_path):
    model = build_msdn(
        rng.random((6, 4)),
        rng.normal(size=(4, 5)),
        [0, 1, 2, 4],
        [3, 5],
        feature_dim=7,
        fusion_weights=(0.7, 0.3),
        lambda_cal=0.2,
        normalize_attribute_vectors=True,
        distillation="paper",
        bias=0.25,
    )
    for w in model.trainable_weights:
        w.assign(rng.normal(size=w.shape).astype("float32"))
    x = rng.random((3, 9, 7)).astype("float32")
    config = json.loads(json.dumps(model.get_config()))
    clone = MSDN.from_config(config)
    assert clone.get_config() == model.get_config()

    path = tmp_path / "msdn.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config() == model.get_config()
    want, got = model(x), loaded(x)
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
    np.testing.assert_array_equal(np.asarray(loaded.mask_bias), np.asarray(model.mask_bias))
    assert float(loaded.bias) == 0.25
