"""Zero-shot evaluation metrics (docs/reference.md §7), on NumPy arrays of logits.

All accuracies are per-class means of top-1 accuracy, as fractions in [0, 1].

Reference:
    Xian et al., "Zero-Shot Learning - A Comprehensive Evaluation of the Good,
    the Bad and the Ugly", TPAMI 2018 (per-class accuracy, GZSL harmonic mean);
    Chen et al., MSDN, CVPR 2022, §4.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def per_class_accuracy(labels, predictions, classes: Optional[Sequence[int]] = None) -> float:
    """Mean over classes of the top-1 accuracy within each class.

    Args:
        labels: ``(N,)`` true class ids.
        predictions: ``(N,)`` predicted class ids.
        classes: classes to average over; default the classes present in ``labels``.
            A listed class with no samples is skipped.

    Returns:
        Accuracy in [0, 1]; 0.0 when there is nothing to average.

    Example:
        >>> per_class_accuracy([0, 0, 0, 1], [0, 0, 0, 0])  # per-sample accuracy would be 0.75
        0.5
    """
    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    classes = np.unique(labels) if classes is None else np.asarray(classes)
    accs = [np.mean(predictions[labels == c] == c) for c in classes if np.any(labels == c)]
    return float(np.mean(accs)) if accs else 0.0


def per_class_accuracies(labels, predictions, classes) -> dict:
    """``{class_id: accuracy}`` for every listed class that has samples."""
    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    return {int(c): float(np.mean(predictions[labels == c] == c)) for c in classes if np.any(labels == c)}


def harmonic_mean(u: float, s: float) -> float:
    """``H = 2US / (U + S)``, and 0 when both are 0."""
    return 0.0 if u + s == 0 else float(2.0 * u * s / (u + s))


def czsl_predictions(logits, unseen_classes) -> np.ndarray:
    """Argmax over the unseen-class columns only, mapped back to class ids."""
    unseen = np.asarray(unseen_classes)
    return unseen[np.argmax(np.asarray(logits)[:, unseen], axis=1)]


def gzsl_predictions(logits, seen_classes=None, gamma: float = 0.0) -> np.ndarray:
    """Argmax over all classes, after subtracting ``gamma`` from seen-class scores (calibrated stacking)."""
    logits = np.array(logits, dtype=np.float64, copy=True)
    if gamma and seen_classes is not None:
        logits[:, np.asarray(seen_classes)] -= gamma
    return np.argmax(logits, axis=1)


def zsl_metrics(
    logits_seen, labels_seen, logits_unseen, labels_unseen, seen_classes, unseen_classes, gamma: float = 0.0
) -> dict:
    """CZSL accuracy and GZSL U, S, H from the logits of the two test splits.

    Args:
        logits_seen, labels_seen: ``(n_s, C)`` logits and labels of test_seen.
        logits_unseen, labels_unseen: ``(n_u, C)`` logits and labels of test_unseen.
        seen_classes, unseen_classes: class ids.
        gamma: calibrated-stacking constant subtracted from seen scores (0: none, as the reference).

    Returns:
        ``{"acc": CZSL, "U": ..., "S": ..., "H": ...}``, fractions in [0, 1].
    """
    acc = per_class_accuracy(labels_unseen, czsl_predictions(logits_unseen, unseen_classes), unseen_classes)
    u = per_class_accuracy(labels_unseen, gzsl_predictions(logits_unseen, seen_classes, gamma), unseen_classes)
    s = per_class_accuracy(labels_seen, gzsl_predictions(logits_seen, seen_classes, gamma), seen_classes)
    return {"acc": acc, "U": u, "S": s, "H": harmonic_mean(u, s)}
