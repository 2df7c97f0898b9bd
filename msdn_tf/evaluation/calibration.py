"""Calibrated stacking and the seen-unseen accuracy curve (AUSUC).

Calibrated stacking (Chao et al. 2016) subtracts a constant ``gamma`` from the
scores of the seen classes before the GZSL argmax
(:func:`msdn_tf.evaluation.metrics.gzsl_predictions`). With the convention of this package:

* ``gamma -> -inf``: seen scores dominate, only seen classes are predicted:
  ``U = 0`` and ``S`` is the accuracy of the argmax over the seen columns;
* ``gamma -> +inf``: only unseen classes are predicted: ``S = 0`` and ``U``
  equals the CZSL accuracy (argmax over the unseen columns).

Every image switches from its best seen class to its best unseen class at
exactly one ``gamma``: ``d = max_seen - max_unseen``. ``S`` and ``U`` are
therefore step functions of ``gamma`` that change only at those values, and
:func:`seen_unseen_curve` evaluates them once between every pair of
neighbouring switch points, plus beyond both ends: the whole curve, exactly,
in ``O(N log N)``.

The constant acts on top of the model's own margin: MSDN's logits keep
``bias * mask_bias`` (+bias unseen, -bias seen) at test, as the reference's do,
so the fused scores already favour unseen classes by ``2 * bias * (w1 + w2)``
(2 with the reference's bias 1): ``gamma = 0`` is the reference's prediction,
and the curve's ``gamma`` axis is relative to it (docs/reference.md §7).

AUSUC is the area under the curve of ``U`` (y) against ``S`` (x), by the
trapezoid rule after sorting by ``S``.

Reference:
    Chao, Changpinyo, Gong, Sha, "An Empirical Study and Analysis of Generalized
    Zero-Shot Learning for Object Recognition in the Wild", ECCV 2016, §3.2-3.3.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from msdn_tf.errors import MSDNError
from msdn_tf.evaluation.metrics import harmonic_mean


def _class_weights(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per-sample weights so that a weighted sum of 0/1 correctness is the per-class mean accuracy.

    Matches :func:`msdn_tf.evaluation.metrics.per_class_accuracy`: classes without samples are skipped.
    """
    present = [c for c in classes if np.any(labels == c)]
    weights = np.zeros(labels.shape[0], dtype=np.float64)
    for c in present:
        members = labels == c
        weights[members] = 1.0 / (members.sum() * len(present))
    return weights


def _switch_points(logits: np.ndarray, labels: np.ndarray, seen: np.ndarray, unseen: np.ndarray):
    """``(d, correct if seen predicted, correct if unseen predicted)`` for every image."""
    logits = np.asarray(logits, dtype=np.float64)
    seen_cols, unseen_cols = logits[:, seen], logits[:, unseen]
    best_seen = seen[np.argmax(seen_cols, axis=1)]
    best_unseen = unseen[np.argmax(unseen_cols, axis=1)]
    d = seen_cols.max(axis=1) - unseen_cols.max(axis=1)
    return d, best_seen == labels, best_unseen == labels


def _accuracy_at(gammas: np.ndarray, d, correct_seen, correct_unseen, weights) -> np.ndarray:
    """Per-class accuracy at every gamma: image i predicts its seen class iff ``gamma < d_i``."""
    order = np.argsort(d)
    d_sorted = d[order]
    gain = (weights * (correct_seen.astype(np.float64) - correct_unseen))[order]
    # suffix sums: total gain of the images with d > gamma
    suffix = np.concatenate([np.cumsum(gain[::-1])[::-1], [0.0]])
    base = float(np.sum(weights * correct_unseen))
    first_above = np.searchsorted(d_sorted, gammas, side="right")
    return base + suffix[first_above]


def seen_unseen_curve(
    logits_seen,
    labels_seen,
    logits_unseen,
    labels_unseen,
    seen_classes,
    unseen_classes,
    max_points: Optional[int] = None,
) -> dict:
    """The exact seen-unseen accuracy curve over the calibration constant ``gamma``.

    Args:
        logits_seen, labels_seen: ``(n_s, C)`` scores and labels of the seen-class test images.
        logits_unseen, labels_unseen: ``(n_u, C)`` scores and labels of the unseen-class test images.
        seen_classes, unseen_classes: class ids.
        max_points: keep at most this many curve points (evenly thinned, ends kept);
            default all. AUSUC is always computed on the full curve.

    Returns:
        ``{"gamma", "S", "U", "H"}`` lists ordered by increasing gamma (the first
        point is below every switch point, the last above), ``"ausuc"``, and
        ``"best"``: the point of highest H (``gamma`` in the middle of its interval).

    Example:
        >>> curve = seen_unseen_curve(ls, ys, lu, yu, seen, unseen)
        >>> curve["S"][0], curve["U"][-1]  # only seen / only unseen predicted
    """
    seen = np.asarray(seen_classes, dtype=np.int64)
    unseen = np.asarray(unseen_classes, dtype=np.int64)
    if seen.size == 0 or unseen.size == 0:
        raise MSDNError("the seen-unseen curve needs at least one seen and one unseen class")
    ys = np.asarray(labels_seen).reshape(-1)
    yu = np.asarray(labels_unseen).reshape(-1)
    d_s, cs_s, cu_s = _switch_points(logits_seen, ys, seen, unseen)
    d_u, cs_u, cu_u = _switch_points(logits_unseen, yu, seen, unseen)
    points = np.unique(np.concatenate([d_s, d_u]))
    points = points[np.isfinite(points)]
    if points.size == 0:
        points = np.zeros(1)
    span = max(1.0, float(points[-1] - points[0]))
    gammas = np.concatenate([[points[0] - span], (points[:-1] + points[1:]) / 2.0, [points[-1] + span]])
    s = _accuracy_at(gammas, d_s, cs_s, cu_s, _class_weights(ys, seen))
    u = _accuracy_at(gammas, d_u, cs_u, cu_u, _class_weights(yu, unseen))
    h = np.array([harmonic_mean(a, b) for a, b in zip(u, s)])
    best = int(np.argmax(h))
    curve = {
        "gamma": gammas,
        "S": s,
        "U": u,
        "H": h,
        "ausuc": ausuc(s, u),
        "best": {"gamma": float(gammas[best]), "S": float(s[best]), "U": float(u[best]), "H": float(h[best])},
    }
    if max_points is not None and gammas.size > max_points:
        keep = np.unique(np.round(np.linspace(0, gammas.size - 1, max_points)).astype(int))
        keep = np.union1d(keep, [best])
        for key in ("gamma", "S", "U", "H"):
            curve[key] = curve[key][keep]
    for key in ("gamma", "S", "U", "H"):
        curve[key] = [float(v) for v in curve[key]]
    return curve


def ausuc(s: Sequence[float], u: Sequence[float]) -> float:
    """Area under the seen-unseen accuracy curve: trapezoid rule of ``U`` over ``S`` sorted by ``S``.

    Args:
        s: seen accuracies (x), in [0, 1].
        u: unseen accuracies (y), same length.

    Returns:
        The area, in [0, 1] for accuracies in [0, 1].

    Example:
        >>> ausuc([0.0, 0.5, 1.0], [1.0, 0.5, 0.0])
        0.5
    """
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    u = np.asarray(u, dtype=np.float64).reshape(-1)
    if s.shape != u.shape:
        raise ValueError(f"S {s.shape} and U {u.shape} differ in length")
    if s.size < 2:
        return 0.0
    order = np.lexsort((-u, s))  # by S; equal S contributes no area whatever the order
    s, u = s[order], u[order]
    return float(np.sum((s[1:] - s[:-1]) * (u[1:] + u[:-1]) / 2.0))


def best_gamma_on_grid(
    logits_seen, labels_seen, logits_unseen, labels_unseen, seen_classes, unseen_classes, grid: Sequence[float]
) -> dict:
    """The ``gamma`` of a grid with the highest H (ties: the one closest to 0, then the smallest).

    Returns:
        ``{"gamma", "S", "U", "H"}`` of the chosen point.
    """
    from msdn_tf.evaluation.metrics import zsl_metrics

    if len(grid) == 0:
        raise MSDNError("the gamma grid is empty")
    best = None
    for gamma in sorted(float(g) for g in grid):
        m = zsl_metrics(
            logits_seen, labels_seen, logits_unseen, labels_unseen, seen_classes, unseen_classes, gamma=gamma
        )
        key = (m["H"], -abs(gamma))
        if best is None or key > best[0]:
            best = (key, {"gamma": gamma, "S": m["S"], "U": m["U"], "H": m["H"]})
    return best[1]


def choose_gamma(
    logits_seen,
    labels_seen,
    logits_unseen,
    labels_unseen,
    seen_classes,
    unseen_classes,
    grid: Optional[Sequence[float]] = None,
) -> dict:
    """Calibration constant maximising H: on ``grid`` if given, else over the exact curve."""
    if grid is not None:
        return best_gamma_on_grid(
            logits_seen, labels_seen, logits_unseen, labels_unseen, seen_classes, unseen_classes, grid
        )
    return seen_unseen_curve(logits_seen, labels_seen, logits_unseen, labels_unseen, seen_classes, unseen_classes)[
        "best"
    ]


def plot_curve(curve: dict, path, title: str = "seen-unseen accuracy curve", marks=()) -> None:
    """Write the curve (U against S, in %) as a PNG, with optional marked points.

    Args:
        curve: :func:`seen_unseen_curve`'s result.
        path: output ``.png`` (written atomically).
        title: plot title; the AUSUC is appended.
        marks: ``(label, S, U)`` points to mark, e.g. gamma = 0 and the chosen gamma.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from msdn_tf.utils import atomic_path

    s = 100.0 * np.asarray(curve["S"])
    u = 100.0 * np.asarray(curve["U"])
    order = np.argsort(s, kind="stable")
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    ax.plot(s[order], u[order], drawstyle="default", color="tab:blue", lw=1.5)
    ax.fill_between(s[order], u[order], alpha=0.12, color="tab:blue")
    for (label, ms, mu), style in zip(marks, ("o", "s", "^", "D")):
        ax.plot([100.0 * ms], [100.0 * mu], style, label=label)
    ax.set_xlabel("S: accuracy on seen-class test images (%)")
    ax.set_ylabel("U: accuracy on unseen-class test images (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}\nAUSUC = {100.0 * curve['ausuc']:.2f}", fontsize=10)
    if marks:
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
