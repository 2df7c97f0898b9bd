"""Run a model over the test splits and compute the zero-shot metrics (docs/reference.md §7)."""

from __future__ import annotations

import numpy as np

from msdn_tf.data.base import ZSLData
from msdn_tf.data.pipeline import eval_dataset
from msdn_tf.evaluation.metrics import zsl_metrics

LOGIT_KEYS = ("logits", "logits_a2v", "logits_v2a")


def predict_logits(model, data: ZSLData, indices, batch_size: int = 100, verbose=0) -> dict:
    """Fused and per-sub-net logits for the rows ``indices``: ``{key: (n, C) array}``.

    ``verbose`` is Keras' progress display (0 silent, 1 progress bar, 2 one line).
    """
    outputs = model.predict(eval_dataset(data, indices, batch_size), verbose=verbose)
    return {k: np.asarray(outputs[k]) for k in LOGIT_KEYS}


def evaluate_model(model, data: ZSLData, batch_size: int = 100, gamma: float = 0.0,
                   return_logits: bool = False, verbose=0) -> dict:
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
    """
    seen_logits = predict_logits(model, data, data.test_seen_loc, batch_size, verbose)
    unseen_logits = predict_logits(model, data, data.test_unseen_loc, batch_size, verbose)
    y_s = data.labels[data.test_seen_loc]
    y_u = data.labels[data.test_unseen_loc]
    seen, unseen = data.seen_classes, data.unseen_classes

    def metrics(key):
        return zsl_metrics(seen_logits[key], y_s, unseen_logits[key], y_u, seen, unseen, gamma=gamma)

    result = metrics("logits")
    result["a2v"] = metrics("logits_a2v")
    result["v2a"] = metrics("logits_v2a")
    if return_logits:
        result["_logits"] = {"seen": seen_logits, "unseen": unseen_logits, "labels_seen": y_s,
                             "labels_unseen": y_u}
    return result
