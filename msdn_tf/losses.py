"""MSDN losses as pure functions of class logits, written in ``keras.ops``.

Every function takes logits ``(B, C)`` (and labels or masks) and returns a
scalar. The defaults are what the reference code computes (docs/reference.md §4);
the paper's forms are the ``*_paper`` variants and are chosen in the config
(``loss.cross_entropy``, ``loss.calibration``, ``loss.distillation``).

Reference:
    Chen et al., "MSDN: Mutually Semantic Distillation Network for Zero-Shot
    Learning", CVPR 2022, Eqs. 7 (cross-entropy and self-calibration) and 8
    (distillation).
"""

from __future__ import annotations

from keras import ops

from msdn_tf.options import DISTILLATION_FORMS


def _log_softmax(logits):
    return logits - ops.logsumexp(logits, axis=-1, keepdims=True)


def cross_entropy(logits, labels, class_mask=None):
    """Mean cross-entropy of integer labels.

    Args:
        logits: ``(B, C)`` class logits, margin already removed.
        labels: ``(B,)`` integer class ids.
        class_mask: optional ``(C,)`` 0/1 mask of the classes the softmax runs over.
            ``None`` (the reference, §4) uses all C classes; the seen-class mask
            gives the paper's Eq. 7 form (:func:`cross_entropy_seen`).

    Returns:
        Scalar ``mean_b(-log softmax(S)_b[y_b])``.

    Example:
        >>> import numpy as np
        >>> float(cross_entropy(np.zeros((2, 4), "float32"), np.array([0, 3])))  # ln 4
        1.386...
    """
    logits = ops.convert_to_tensor(logits)
    if class_mask is not None:
        mask = ops.cast(ops.convert_to_tensor(class_mask), logits.dtype)
        logits = ops.where(mask > 0, logits, ops.full_like(logits, -1e9))
    logp = _log_softmax(logits)
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    picked = ops.take_along_axis(logp, ops.expand_dims(labels, -1), axis=-1)
    return -ops.mean(picked)


def cross_entropy_seen(logits, labels, seen_mask):
    """The paper's cross-entropy: softmax over seen classes only (Eq. 7)."""
    return cross_entropy(logits, labels, class_mask=seen_mask)


def self_calibration(logits, unseen_mask):
    """Reference self-calibration: ``-log(mean_b sum_{u in U} softmax(S)_b[u])`` (§4).

    The log of the batch-mean unseen probability mass, not a mean of logs. The
    reference computes it on the logits WITH the margin ``bias * mask_bias``
    (+bias unseen, -bias seen): the code's form of the paper's ±1 indicator.

    Args:
        logits: ``(B, C)`` class logits including the margin.
        unseen_mask: ``(C,)`` 1 for unseen classes, 0 for seen ones.

    Returns:
        Scalar loss.

    Example:
        >>> import numpy as np
        >>> float(self_calibration(np.zeros((3, 4), "float32"), np.array([0, 0, 0, 1.])))  # -ln(1/4)
        1.386...
    """
    log_unseen = log_unseen_mass(logits, unseen_mask)  # (B,)
    batch = ops.cast(ops.shape(log_unseen)[0], log_unseen.dtype)
    return -(ops.logsumexp(log_unseen) - ops.log(batch))


def log_unseen_mass(logits, unseen_mask):
    """Per sample, ``log sum_{u in U} softmax(S)_b[u]`` ``(B,)``, computed in log space for stability.

    :func:`self_calibration` is ``-log`` of the batch mean of its exponential;
    training on several replicas averages it over the global batch
    (:func:`msdn_tf.distribute.cross_replica_log_mean_exp`).
    """
    logits = ops.convert_to_tensor(logits)
    mask = ops.cast(ops.convert_to_tensor(unseen_mask), logits.dtype)
    logp = _log_softmax(logits)
    return ops.logsumexp(ops.where(mask > 0, logp, ops.full_like(logp, -1e9)), axis=-1)


def self_calibration_paper(logits, unseen_mask, margin=1.0):
    """The paper's self-calibration (Eq. 7) with the ±1 indicator.

    Every logit gets ``+margin`` for unseen and ``-margin`` for seen classes; the
    loss is the per-sample sum over unseen classes of ``-log p_u``, averaged over
    the batch.

    Args:
        logits: ``(B, C)`` class logits.
        unseen_mask: ``(C,)`` 1 for unseen classes, 0 for seen ones.
        margin: size of the indicator (1 in the paper).

    Returns:
        Scalar loss.
    """
    logits = ops.convert_to_tensor(logits)
    mask = ops.cast(ops.convert_to_tensor(unseen_mask), logits.dtype)
    shifted = logits + margin * (2.0 * mask - 1.0)
    logp = _log_softmax(shifted)
    return -ops.mean(ops.sum(logp * mask, axis=-1))


def jensen_shannon(logits_1, logits_2):
    """Jensen-Shannon divergence of the two sub-nets' class distributions (§4, Eq. 8).

    ``0.5 * [KL(q || m) + KL(p || m)]`` with ``p = softmax(S1)``, ``q = softmax(S2)``,
    ``m = (p + q) / 2``; each KL is summed over classes and averaged over the batch.

    Args:
        logits_1, logits_2: ``(B, C)`` logits of the A->V and V->A sub-nets.

    Returns:
        Scalar divergence (no stop-gradient: both sub-nets learn from it).
    """
    logp = _log_softmax(ops.convert_to_tensor(logits_1))
    logq = _log_softmax(ops.convert_to_tensor(logits_2))
    p, q = ops.exp(logp), ops.exp(logq)
    logm = ops.log(0.5 * (p + q) + 1e-30)
    kl_pm = ops.sum(p * (logp - logm), axis=-1)
    kl_qm = ops.sum(q * (logq - logm), axis=-1)
    return 0.5 * (ops.mean(kl_qm) + ops.mean(kl_pm))


def cubic_logit_distance(logits_1, logits_2):
    """The reference logit term: ``(1/B) sum_b (sum_c |d_bc|^3) / ||d_b||_2``, ``d = S1 - S2`` (§4).

    A sample whose two logit vectors are identical contributes 0 (and a zero
    gradient) instead of the reference's 0/0.
    """
    d = ops.convert_to_tensor(logits_1) - ops.convert_to_tensor(logits_2)
    sq = ops.sum(d * d, axis=-1)
    safe = ops.where(sq > 0, sq, ops.ones_like(sq))
    per_sample = ops.where(sq > 0, ops.sum(ops.abs(d) ** 3, axis=-1) / ops.sqrt(safe), ops.zeros_like(sq))
    return ops.mean(per_sample)


def squared_l2_distance(logits_1, logits_2):
    """The paper's prediction term: batch mean of ``||S1 - S2||_2^2`` (Eq. 8)."""
    d = ops.convert_to_tensor(logits_1) - ops.convert_to_tensor(logits_2)
    return ops.mean(ops.sum(d * d, axis=-1))


def distillation(logits_1, logits_2, form: str = "reference"):
    """Mutual distillation between the two sub-nets.

    Args:
        logits_1, logits_2: ``(B, C)`` logits of the two sub-nets.
        form: ``reference`` (JSD + cubic logit term, §4), ``paper`` (JSD + squared
            l2, Eq. 8), ``jsd`` (JSD only), ``logit`` (cubic logit term only) or
            ``none`` (0; the ablations without distillation).

    Returns:
        Scalar loss.
    """
    if form == "reference":
        return jensen_shannon(logits_1, logits_2) + cubic_logit_distance(logits_1, logits_2)
    if form == "paper":
        return jensen_shannon(logits_1, logits_2) + squared_l2_distance(logits_1, logits_2)
    if form == "jsd":
        return jensen_shannon(logits_1, logits_2)
    if form == "logit":
        return cubic_logit_distance(logits_1, logits_2)
    if form == "none":
        return ops.zeros((), dtype=ops.convert_to_tensor(logits_1).dtype)
    raise ValueError(f"unknown distillation form {form!r}; expected one of {DISTILLATION_FORMS}")
