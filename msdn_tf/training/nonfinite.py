"""Stop training at the first NaN or inf, and say where it came from.

:class:`NonFiniteGuard` is the Keras callback that stops ``fit`` (or the multi-worker
loop) at the first bad step; :func:`nonfinite_message` names the step and what went
non-finite first: input rows (file and row), loss terms, gradients or weights.
"""

from __future__ import annotations

import math

import numpy as np

from msdn_tf.training.checkpoint import checkpoint_note

NONFINITE = "nonfinite"  # msdn_tf.model.NONFINITE (not imported here: that module imports Keras)


class NonFiniteGuard:
    """Keras callback that stops ``fit`` at the first step with a NaN or inf.

    It reads the running means of the loss terms in the step's logs (non-finite from the
    first bad step on) and the ``nonfinite`` tracker of the model, the sum of
    :meth:`msdn_tf.model.MSDN.nonfinite_code` (input features, gradients, updated weights).
    That code is not a metric, so it is not in ``fit``'s logs or progress bar; the
    multi-worker loop, which reduces it itself, passes it in the logs.
    """

    def __new__(cls):
        import keras

        class Callback(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.offset = 0
                self.failure = None  # (step, non-finite loss terms, failed checks code)
                self.done = 0  # the last step finished (for the message of an interruption)

            def on_train_batch_end(self, batch, logs=None):
                self.done = self.offset + batch + 1
                logs = logs or {}
                code = float(logs[NONFINITE]) if NONFINITE in logs else self.nonfinite_code()
                terms = [k for k, v in logs.items() if k != NONFINITE and not math.isfinite(float(v))]
                if code or terms:
                    self.failure = (self.offset + batch + 1, terms, code)
                    self.model.stop_training = True

            def nonfinite_code(self):
                tracker = self.model.trackers.get(NONFINITE) if hasattr(self.model, "trackers") else None
                return 0.0 if tracker is None else float(keras.ops.convert_to_numpy(tracker.result()))

        return Callback()


def nonfinite_message(guard, data, sampler, checkpointer, strategy) -> str:
    """Name the step and what went non-finite first: input rows, loss terms, gradients or weights."""
    from msdn_tf.data.base import describe_rows, feature_file, nonfinite_rows
    from msdn_tf.model import NONFINITE_CHECKS

    step, terms, code = guard.failure
    base = (1 if strategy is None else strategy.num_replicas_in_sync) + 1  # no strategy on JAX
    failed = [name for i, name in enumerate(NONFINITE_CHECKS) if int(code) // base**i % base]
    head = f"training step {step}: "
    tail = f". Nothing was saved for this run's result. {checkpoint_note(checkpointer)}."
    if "input features" in failed:
        batch = sampler.batch(step - 1)
        rows = nonfinite_rows(data.features, batch)
        where = feature_file(data.features, data.source)
        which = (
            f"feature {describe_rows(rows)}"
            if rows.size
            else f"one of the feature {describe_rows(np.unique(batch), limit=60)} (they read back finite now)"
        )
        return head + f"the input batch holds NaN or infinite values: {where}, {which}; fix or drop these images" + tail
    if terms:
        return (
            head + f"loss term{'s' if len(terms) > 1 else ''} {', '.join(terms)} became NaN or infinite "
            "(inputs were finite); lower optimizer.learning_rate or check the loss settings" + tail
        )
    if "gradients" in failed:
        return head + "the gradients hold NaN or infinite values (the loss terms were finite)" + tail
    return (
        head + "the weights became NaN or infinite in the update (inputs, loss and gradients were "
        "finite); check the optimizer settings" + tail
    )
