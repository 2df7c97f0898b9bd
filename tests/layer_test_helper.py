"""A shared check of the Keras layer contract (in the spirit of keras-hub's run_layer_test).

The first input is batched; any further inputs (the attribute vectors ``V``) are not.
"""

import json

import keras
import numpy as np


def run_layer_test(layer_cls, init_kwargs, inputs, expected_weight_names, tmp_path, call_kwargs=None):
    """Config round trip (through JSON), named weights built in build(), eager and symbolic calls,
    one ``fit`` step, a mixed-precision policy, and .keras save/load."""
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

    _check_symbolic_call(layer_cls(**init_kwargs), inputs, call_kwargs, out)
    _check_one_fit_step(layer_cls(**init_kwargs), inputs, call_kwargs)
    _check_mixed_precision(layer_cls, init_kwargs, inputs, call_kwargs)
    return out


def _symbolic_inputs(inputs):
    if isinstance(inputs, (list, tuple)):
        return [
            keras.Input(batch_shape=(None,) + tuple(x.shape[1:])) if i == 0 else keras.Input(batch_shape=x.shape)
            for i, x in enumerate(inputs)
        ]
    return keras.Input(batch_shape=(None,) + tuple(inputs.shape[1:]))


def _leaves(out):
    return [out[k] for k in sorted(out)] if isinstance(out, dict) else [out]


def _check_symbolic_call(layer, inputs, call_kwargs, eager_out):
    """A functional-API call gives KerasTensors of the eager shapes, batch left unknown."""
    symbolic = layer(_symbolic_inputs(inputs), **call_kwargs)
    for sym, eager in zip(_leaves(symbolic), _leaves(eager_out)):
        assert isinstance(sym, keras.KerasTensor)
        assert sym.shape[0] is None and tuple(sym.shape[1:]) == tuple(eager.shape[1:])


class FitWrapper(keras.Model):
    """The layer on the batched input, its other inputs held constant; outputs one number per sample."""

    def __init__(self, inner, constants, call_kwargs):
        super().__init__(name="fit_wrapper")
        self.inner, self.constants, self.call_kwargs = inner, constants, call_kwargs

    def call(self, x):
        out = self.inner([x, *self.constants] if self.constants else x, **self.call_kwargs)
        per_sample = [
            keras.ops.mean(keras.ops.reshape(keras.ops.cast(t, "float32"), (keras.ops.shape(t)[0], -1)), axis=1)
            for t in _leaves(out)
        ]
        return keras.ops.stack(per_sample, axis=1)


def _check_one_fit_step(layer, inputs, call_kwargs):
    """``fit`` trains the layer: one step with a finite loss changes its trainable weights."""
    batched, constants = (inputs[0], list(inputs[1:])) if isinstance(inputs, (list, tuple)) else (inputs, [])
    model = FitWrapper(layer, [keras.ops.convert_to_tensor(c) for c in constants], call_kwargs)
    target = np.ones(
        (batched.shape[0], len(_leaves(model.inner([batched, *constants] if constants else batched, **call_kwargs)))),
        "float32",
    )
    before = [np.array(w) for w in layer.trainable_weights]
    assert before, "the layer has no trainable weights to fit"
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history = model.fit(batched, target, batch_size=batched.shape[0], epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(b, np.array(w)) for b, w in zip(before, layer.trainable_weights))


def _check_mixed_precision(layer_cls, init_kwargs, inputs, call_kwargs):
    """Under ``mixed_bfloat16`` the variables stay float32 and the outputs agree with float32's."""
    layer = layer_cls(**init_kwargs, dtype="mixed_bfloat16")
    layer(inputs, **call_kwargs)
    assert all(w.dtype == "float32" for w in layer.weights)
    reference = layer_cls(**init_kwargs)
    reference(inputs, **call_kwargs)
    layer.set_weights(reference.get_weights())
    out = layer(inputs, **call_kwargs)
    for got, want in zip(_leaves(out), _leaves(reference(inputs, **call_kwargs))):
        got = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(got, "float32")))
        want = np.asarray(want)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=0.1, atol=0.05 * (np.abs(want).max() + 1e-6))


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
