"""Run a model over the test splits and compute the zero-shot metrics (docs/reference.md §7)."""

from __future__ import annotations

import numpy as np

from msdn_tf.data.base import ZSLData, describe_rows, feature_file, nonfinite_rows
from msdn_tf.data.pipeline import eval_dataset
from msdn_tf.errors import NonFiniteError
from msdn_tf.evaluation.metrics import zsl_metrics

LOGIT_KEYS = ("logits", "logits_a2v", "logits_v2a")


def predict_logits(model, data: ZSLData, indices, batch_size: int = 100, verbose=0) -> dict:
    """Fused and per-sub-net logits for the rows ``indices``: ``{key: (n, C) array}``.

    ``verbose`` is Keras' progress display (0 silent, 1 progress bar, 2 one line).
    On JAX the rows go to the device in large blocks, many batches per dispatch
    (:func:`msdn_tf.training_jax.predict_rows`; no progress display).
    """
    from msdn_tf.backend import on_jax

    if on_jax():
        from msdn_tf.training_jax import predict_rows

        read = getattr(data.features, "read_native", None) or data.features.read
        return predict_rows(model, read, indices, batch_size)
    outputs = model.predict(eval_dataset(data, indices, batch_size), verbose=verbose)
    return {k: np.asarray(outputs[k]) for k in LOGIT_KEYS}


def check_finite_outputs(model, data: ZSLData, indices, logits: dict, split: str) -> None:
    """Raise :class:`NonFiniteError` if any logit is NaN or inf, naming the cause.

    The cause is looked for where it can be: first the model's weights, then the
    feature rows whose logits are non-finite (file and 0-based row). Costs one
    ``isfinite`` over the logits when all is well.
    """
    bad = np.zeros(len(indices), dtype=bool)
    for value in logits.values():
        bad |= ~np.isfinite(value.reshape(len(indices), -1)).all(axis=1)
    if not bad.any():
        return
    weights = [w.path for w in model.weights if not np.all(np.isfinite(np.asarray(w)))]
    if weights:
        raise NonFiniteError(f"the model's weights {', '.join(weights[:5])} hold NaN or infinite values")
    rows = nonfinite_rows(data.features, np.asarray(indices)[bad])
    if rows.size:
        raise NonFiniteError(
            f"{feature_file(data.features, data.source)}: feature {describe_rows(rows)} "
            f"({split}) hold NaN or infinite values; fix or drop these images"
        )
    raise NonFiniteError(
        f"the model's outputs for {int(bad.sum())} {split} images are NaN or infinite "
        "although its weights and inputs are finite (an overflow)"
    )


def zsl_arguments(logits: dict, data: ZSLData, key: str = "logits") -> tuple:
    """``(logits_seen, labels_seen, logits_unseen, labels_unseen, seen_classes, unseen_classes)``.

    The positional arguments of :func:`~msdn_tf.evaluation.metrics.zsl_metrics` and the
    calibration functions, from the ``"_logits"`` that :func:`evaluate_model` returns
    (``key``: the fused logits or one sub-net's).
    """
    return (
        logits["seen"][key],
        logits["labels_seen"],
        logits["unseen"][key],
        logits["labels_unseen"],
        data.seen_classes,
        data.unseen_classes,
    )


def evaluate_model(
    model, data: ZSLData, batch_size: int = 100, gamma: float = 0.0, return_logits: bool = False, verbose=0
) -> dict:
    """CZSL accuracy and GZSL U/S/H of the fused logits, plus each sub-net's.

    Args:
        model: an :class:`msdn_tf.model.MSDN` (fusion weights are the model's).
        data: the dataset; uses ``test_seen_loc`` and ``test_unseen_loc``.
        batch_size: evaluation batch size (100 in the reference).
        gamma: calibrated-stacking constant (0: none, as the reference).
        return_logits: also return the logits and labels under ``"_logits"``.
        verbose: Keras' progress display while predicting (0 silent).

    Returns:
        ``{"acc", "U", "S", "H", "a2v": {...}, "v2a": {...}}`` with fractions in [0, 1].

    Raises:
        NonFiniteError: a logit is NaN or inf (the message names the weights or the
            feature file and rows responsible); no metric is computed from it.
    """
    seen_logits = predict_logits(model, data, data.test_seen_loc, batch_size, verbose)
    unseen_logits = predict_logits(model, data, data.test_unseen_loc, batch_size, verbose)
    check_finite_outputs(model, data, data.test_seen_loc, seen_logits, "test_seen_loc")
    check_finite_outputs(model, data, data.test_unseen_loc, unseen_logits, "test_unseen_loc")
    y_s = data.labels[data.test_seen_loc]
    y_u = data.labels[data.test_unseen_loc]
    seen, unseen = data.seen_classes, data.unseen_classes

    def metrics(key):
        return zsl_metrics(seen_logits[key], y_s, unseen_logits[key], y_u, seen, unseen, gamma=gamma)

    result = metrics("logits")
    result["a2v"] = metrics("logits_a2v")
    result["v2a"] = metrics("logits_v2a")
    if return_logits:
        result["_logits"] = {"seen": seen_logits, "unseen": unseen_logits, "labels_seen": y_s, "labels_unseen": y_u}
    return result
