"""MSDN's train, test and predict steps on the JAX backend (Keras 3's stateless pattern).

Keras' JAX trainer (``keras/src/backend/jax/trainer.py``) keeps the model's state
outside the variables while ``fit``/``predict`` run: it calls
``model.train_step(state, data)`` with ``state = (trainable, non_trainable,
optimizer, metrics)`` variable VALUES and expects ``(logs, new_state)`` back; it
``jax.jit``-compiles that function. :class:`~msdn_tf.model.MSDN` dispatches its
steps here when ``keras.backend.backend() == "jax"``.

The loss is :meth:`MSDN.compute_loss_terms`, the function the TensorFlow step
differentiates with a ``GradientTape``, and the trackers are the same
``keras.metrics.Mean`` objects (``MSDN._update_trackers``). Only the mechanics
differ: the forward pass is ``model.stateless_call``, the gradient
``jax.value_and_grad``, the update ``optimizer.stateless_apply``, and variables
(the margin the loss reads, the trackers' totals) are read and written through a
``keras.StatelessScope``.

This module imports JAX, never TensorFlow.
"""

from __future__ import annotations

import jax
import keras


def _scope(variables, values):
    """A ``StatelessScope`` in which ``variables`` read as ``values``."""
    return keras.StatelessScope(state_mapping=list(zip(variables, values)))


def _loss(model, trainable, non_trainable, optimizer_variables, features, labels):
    """``(scaled loss, (terms, outputs, new non-trainable values))`` of one batch: what JAX differentiates."""
    outputs, non_trainable = model.stateless_call(
        trainable, non_trainable, features, training=True, return_features=False
    )
    with _scope(model.non_trainable_variables, non_trainable):  # the loss reads the margin (bias, mask_bias)
        terms = model.compute_loss_terms(outputs, labels)
    with _scope(model.optimizer.variables, optimizer_variables):  # a LossScaleOptimizer's scale is a variable
        loss = model.optimizer.scale_loss(terms["loss"])  # other optimizers pass it through
    return loss, (terms, outputs, non_trainable)


def _update_trackers(model, metrics_variables, terms, batch_size=None, nonfinite=None, labels=None, outputs=None):
    """``(logs, new metrics values)``: ``MSDN._update_trackers`` run on the given tracker state.

    ``nonfinite``: this step's :meth:`~msdn_tf.model.MSDN.nonfinite_code`, added to the
    ``nonfinite`` tracker (not to the logs, as the TensorFlow step does). ``labels`` and
    ``outputs``: update the metrics of ``compile(metrics=...)`` (:meth:`MSDN.compute_metrics`).
    """
    from msdn_tf.model import NONFINITE

    with _scope(model.metrics_variables, metrics_variables) as scope:
        logs = model._update_trackers(terms, batch_size)
        if outputs is not None:
            logs.update(model.compute_metrics(None, labels, outputs))
        if nonfinite is not None:
            model.trackers[NONFINITE].update_state(nonfinite)
    new_values = []
    for ref, old in zip(model.metrics_variables, metrics_variables):
        value = scope.get_current_value(ref)
        new_values.append(old if value is None else value)
    return logs, new_values


def train_step(model, state, data):
    """One optimizer step on ``data = (features, labels)``; returns ``(logs, state)`` as Keras' JAX trainer expects.

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
    code = model.nonfinite_code(features, grads, trainable) if model.check_numerics else None
    logs, metrics_variables = _update_trackers(
        model, metrics_variables, terms, nonfinite=code, labels=labels, outputs=outputs
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
    logs, metrics_variables = _update_trackers(model, metrics_variables, terms, labels=labels, outputs=outputs)
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
