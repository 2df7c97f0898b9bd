"""MSDN's train, test and predict steps on the JAX backend (Keras 3's stateless pattern).

Keras' JAX trainer (``keras/src/backend/jax/trainer.py``) keeps the model's state
outside the variables while ``fit``/``predict`` run: it calls
``model.train_step(state, data)`` with ``state = (trainable, non_trainable,
optimizer, metrics)`` variable VALUES and expects ``(logs, new_state)`` back; it
``jax.jit``-compiles that function. :class:`~msdn_tf.model.MSDN` dispatches its
steps here when ``keras.backend.backend() == "jax"``.

The step is the model's own public definition, the one TensorFlow's step runs:
:meth:`MSDN.step_loss` (the loss differentiated) and :meth:`MSDN.record_step`
(the same ``keras.metrics.Mean`` trackers, the non-finite checks). Only the mechanics
differ: the forward pass is ``model.stateless_call``, the gradient
``jax.value_and_grad``, the update ``optimizer.stateless_apply``, and variables
(the margin the loss reads, the trackers' totals) are read and written through a
``keras.StatelessScope``.

This module imports JAX, never TensorFlow, and nothing of msdn_tf (the model imports it).
"""

from __future__ import annotations

import jax
import keras


def _scope(variables, values):
    """A ``StatelessScope`` in which ``variables`` read as ``values``."""
    return keras.StatelessScope(state_mapping=list(zip(variables, values)))


def _loss(model, trainable, non_trainable, optimizer_variables, features, labels):
    """``(loss, (terms, outputs, new non-trainable values))`` of one batch: the function JAX differentiates.

    :meth:`MSDN.step_loss`, with the forward pass made stateless.
    """
    outputs, non_trainable = model.stateless_call(
        trainable, non_trainable, features, training=True, return_features=False
    )
    # The loss reads the margin (bias, mask_bias); a LossScaleOptimizer's scale is a variable.
    with _scope(model.non_trainable_variables + model.optimizer.variables, non_trainable + optimizer_variables):
        loss, terms = model.step_loss(outputs, labels)
    return loss, (terms, outputs, non_trainable)


def _record(model, metrics_variables, terms, labels, features=None, grads=None, trainable=None, outputs=None):
    """``(logs, new metrics values)``: :meth:`MSDN.record_step` run on the given tracker state.

    The ``nonfinite`` code is in the logs: the trackers of a stateless step reach the model
    only when the loop ends, so the non-finite guard reads each step's code from its logs.
    """
    with _scope(model.metrics_variables, metrics_variables) as scope:
        logs = model.record_step(terms, labels, features, grads, trainable, outputs=outputs, log_nonfinite=True)
    new_values = []
    for ref, old in zip(model.metrics_variables, metrics_variables):
        value = scope.get_current_value(ref)
        new_values.append(old if value is None else value)
    return logs, new_values


def train_step(model, state, data):
    """One optimizer step on ``data = (features, labels)``; returns ``(logs, state)`` as Keras' JAX trainer expects.

    The same step as TensorFlow's :meth:`MSDN.train_step`: :meth:`MSDN.step_loss`
    differentiated, the optimizer update, :meth:`MSDN.record_step`. Pure (no variable
    is written), so :mod:`msdn_tf.training.jax_loop` runs it inside ``lax.fori_loop``.

    Args:
        model: the :class:`~msdn_tf.model.MSDN`.
        state: ``(trainable, non_trainable, optimizer, metrics)`` lists of arrays,
            in the order of ``model.trainable_variables``,
            ``model.non_trainable_variables``, ``model.optimizer.variables`` and
            ``model.metrics_variables``.
        data: ``(features (B, R, F) or (B, H, W, F), labels (B,))``.

    Returns:
        ``(logs, new_state)``: the running means of the loss terms, and the state after the step.
    """
    trainable, non_trainable, optimizer_variables, metrics_variables = state
    features, labels = data[0], data[1]
    grad_fn = jax.value_and_grad(
        lambda t: _loss(model, t, non_trainable, optimizer_variables, features, labels), has_aux=True
    )
    (_, (terms, outputs, non_trainable)), grads = grad_fn(trainable)
    trainable, optimizer_variables = model.optimizer.stateless_apply(optimizer_variables, grads, trainable)
    logs, metrics_variables = _record(
        model, metrics_variables, terms, labels, features, grads, trainable, outputs=outputs
    )
    return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)


def test_step(model, state, data):
    """The loss terms of ``data = (features, labels)`` without an update.

    ``state = (trainable, non_trainable, metrics)``.
    """
    trainable, non_trainable, metrics_variables = state
    features, labels = data[0], data[1]
    outputs, non_trainable = model.stateless_call(
        trainable, non_trainable, features, training=False, return_features=False
    )
    with _scope(model.non_trainable_variables, non_trainable):
        terms = model.compute_loss_terms(outputs, labels)
    logs, metrics_variables = _record(model, metrics_variables, terms, labels, features, outputs=outputs)
    return logs, (trainable, non_trainable, metrics_variables)


def predict_step(model, state, data):
    """The fused and per-sub-net logits of a batch; ``state = (trainable, non_trainable)``.

    Returns ``(outputs, non_trainable)`` as Keras' JAX predict loop expects.
    """
    trainable, non_trainable = state
    features = data[0] if isinstance(data, (tuple, list)) else data
    outputs, non_trainable = model.stateless_call(
        trainable, non_trainable, features, training=False, return_features=False
    )
    return {k: outputs[k] for k in ("logits", "logits_a2v", "logits_v2a")}, non_trainable


PREDICT_BLOCK_BYTES = 512 * 1024**2  # feature bytes moved to the device per evaluation dispatch
_PREDICT_FUNCTIONS = {}  # (id(model), batch, batches) -> (model ref, jitted function)


def predict_function(model, batch: int, batches: int):
    """A jitted ``run(trainable, non_trainable, x (batches * batch, ...)) -> {key: (batches * batch, C)}``."""
    import weakref

    import jax.numpy as jnp

    key = (id(model), batch, batches)
    cached = _PREDICT_FUNCTIONS.get(key)
    if cached is not None and cached[0]() is model:
        return cached[1]

    def run(trainable, non_trainable, x):
        def one(xb):
            outputs, _ = model.stateless_call(
                trainable, non_trainable, xb.astype("float32"), training=False, return_features=False
            )
            return {k: outputs[k] for k in ("logits", "logits_a2v", "logits_v2a")}

        out = jax.lax.map(one, jnp.reshape(x, (batches, batch) + x.shape[1:]))
        return {k: jnp.reshape(v, (batches * batch,) + v.shape[2:]) for k, v in out.items()}

    fn = jax.jit(run)
    _PREDICT_FUNCTIONS[key] = (weakref.ref(model), fn)
    return fn


def predict_rows(model, read, indices, batch_size: int = 100) -> dict:
    """Fused and per-sub-net logits of rows ``indices``, many batches per dispatch: ``{key: (n, C)}``.

    Rows are read on the host (``read(rows)``, in the source's own dtype) in blocks of
    up to :data:`PREDICT_BLOCK_BYTES`, each block moved to the device once and run as
    ``lax.map`` over batches of ``batch_size`` (the same batches, so the same memory
    per batch, as ``predict``). JAX dispatches asynchronously, so the host reads the
    next block while the device computes. The last block is padded (by repeating its
    last row) to the block's shape, so a split compiles once.

    Args:
        model: a built :class:`~msdn_tf.model.MSDN` (JAX backend).
        read: ``read(rows) -> (len(rows), R, F) or (len(rows), H, W, F)`` array.
        indices: the rows, in order.
        batch_size: images per forward pass.
    """
    import numpy as np

    indices = np.asarray(indices, dtype=np.int64)
    n = int(indices.size)
    if n == 0:
        return {k: np.zeros((0, model.num_classes), "float32") for k in ("logits", "logits_a2v", "logits_v2a")}
    first = np.asarray(read(indices[:1]))
    per_row = max(1, first.nbytes)
    batches = int(max(1, min(-(-n // batch_size), PREDICT_BLOCK_BYTES // (per_row * batch_size))))
    block = batches * batch_size
    fn = predict_function(model, batch_size, batches)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    pending = []
    for start in range(0, n, block):
        rows = indices[start : start + block]
        x = np.asarray(read(rows))
        if rows.size < block:
            x = np.concatenate([x, np.repeat(x[-1:], block - rows.size, axis=0)])
        pending.append((rows.size, fn(trainable, non_trainable, jax.device_put(x))))
    return {
        key: np.concatenate([np.asarray(out[key])[:size] for size, out in pending])
        for key in ("logits", "logits_a2v", "logits_v2a")
    }
