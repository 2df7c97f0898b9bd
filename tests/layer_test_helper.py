"""A shared check of the Keras layer contract (in the spirit of keras-hub's run_layer_test)."""

import json

import keras
import numpy as np


def run_layer_test(layer_cls, init_kwargs, inputs, expected_weight_names, tmp_path, call_kwargs=None):
    """Config round trip (through JSON), named weights built in build(), eager call and .keras save/load."""
    call_kwargs = call_kwargs or {}
    layer = layer_cls(**init_kwargs)
    assert not layer.weights, "weights must be created in build(), not __init__"
    out = layer(inputs, **call_kwargs)
    assert sorted(w.name for w in layer.weights) == sorted(expected_weight_names)

    config = layer.get_config()
    config_json = json.loads(json.dumps(config))
    clone = layer_cls.from_config(config_json)
    assert clone.get_config() == config
    clone(inputs, **call_kwargs)
    clone.set_weights(layer.get_weights())
    _assert_same(clone(inputs, **call_kwargs), out)

    # .keras round trip of a model wrapping the layer.
    model = _wrap(layer, inputs, call_kwargs)
    path = tmp_path / f"{layer_cls.__name__}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    _assert_same(loaded(inputs), model(inputs))
    return out


def _wrap(layer, inputs, call_kwargs):
    class Wrapper(keras.Model):
        def __init__(self, inner, **kwargs):
            super().__init__(**kwargs)
            self.inner = inner

        def call(self, x):
            return self.inner(x, **call_kwargs)

        def get_config(self):
            return {"inner": keras.saving.serialize_keras_object(self.inner), "name": self.name}

        @classmethod
        def from_config(cls, config):
            return cls(keras.saving.deserialize_keras_object(config.pop("inner")), **config)

    keras.saving.get_custom_objects()["Wrapper"] = Wrapper
    model = Wrapper(layer)
    model(inputs)
    return model


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=0, atol=0)
    else:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)
