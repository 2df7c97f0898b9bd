"""TensorBoard summaries written after every evaluation of :func:`msdn_tf.training.loop.run_training`.

:func:`make_eval_hooks` returns callables for ``run_training(..., eval_hooks=...)``;
each is called as ``hook(model=, data=, step=, metrics=, writer=)``. They write:

* ``attention/maps`` (images): for a fixed set of test examples (half unseen,
  half seen), the top attributes by fused score with the A->V and V->A maps on
  the region grid (:func:`msdn_tf.viz.attention.render_attention`);
* ``gzsl/unseen_predicted_seen`` and ``gzsl/seen_predicted_unseen`` (scalars): the
  fraction of test_unseen images whose GZSL prediction is a seen class, and of
  test_seen images predicted as an unseen class; ``gzsl/seen_unseen_confusion``
  (text): the 2x2 table of counts;
* ``gzsl/per_class_acc_seen``, ``gzsl/per_class_acc_unseen`` and
  ``czsl/per_class_acc_unseen`` (histograms): per-class top-1 accuracies.

The confusion and histograms come from ``metrics["_logits"]`` (evaluation with
``return_logits=True``), so they cost no extra model pass.

Example:
    >>> hooks = make_eval_hooks(config, data, num_examples=4)
    >>> run_training(config, run_dir, data=data, eval_hooks=hooks)
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from msdn_tf.errors import MSDNError
from msdn_tf.evaluation.metrics import czsl_predictions, gzsl_predictions, per_class_accuracies
from msdn_tf.viz.common import Names, map_shape_of

ATTENTION_TAG = "attention/maps"
SCALAR_TAGS = ("gzsl/unseen_predicted_seen", "gzsl/seen_predicted_unseen")
TEXT_TAG = "gzsl/seen_unseen_confusion"
HISTOGRAM_TAGS = ("gzsl/per_class_acc_seen", "gzsl/per_class_acc_unseen", "czsl/per_class_acc_unseen")


def example_rows(data, num_examples: int = 4) -> np.ndarray:
    """A fixed, evenly spaced set of test rows: ``ceil(n/2)`` from test_unseen, the rest from test_seen."""
    n_unseen = (num_examples + 1) // 2
    picks = []
    for loc, n in ((data.test_unseen_loc, n_unseen), (data.test_seen_loc, num_examples - n_unseen)):
        n = min(n, loc.size)
        if n > 0:
            picks.append(loc[np.linspace(0, loc.size - 1, n).round().astype(int)])
    return np.concatenate(picks) if picks else np.zeros((0,), np.int64)


class AttentionImageHook:
    """Writes the attention figure of a fixed set of test examples as ``attention/maps`` images.

    Args:
        data: the dataset (features of the examples are read once, here).
        num_examples: images per summary.
        top_k: attributes per image.
        scale: figure scale (1.0: 100 dpi, ``(top_k + 1) * 200 x 520`` pixels).
    """

    def __init__(self, data, num_examples: int = 4, top_k: int = 4, scale: float = 1.0):
        self.rows = example_rows(data, num_examples)
        self.features = data.features.read(self.rows) if self.rows.size else None
        self.labels = data.labels[self.rows]
        self.map_shape = map_shape_of(data)
        self.names = Names.from_data(data)
        self.split_of = {int(r): "test_unseen" for r in data.test_unseen_loc}
        self.top_k = int(top_k)
        self.scale = float(scale)

    def __call__(self, *, model, data, step, metrics, writer):
        import tensorflow as tf

        from msdn_tf.viz.attention import explain, render_attention
        from msdn_tf.viz.common import figure_to_array

        if self.features is None:
            return
        sources = [{"row": int(r), "split": self.split_of.get(int(r), "test_seen")} for r in self.rows]
        explanations = explain(
            model,
            self.features,
            self.names,
            self.top_k,
            "fused",
            labels=self.labels,
            map_shape=self.map_shape,
            sources=sources,
        )
        images = np.stack([figure_to_array(render_attention(e, scale=self.scale)) for e in explanations])
        with writer.as_default(step=int(step)):
            tf.summary.image(
                ATTENTION_TAG,
                images,
                max_outputs=len(images),
                description="top attributes by fused score; top row A->V attention (sums to 1 "
                "over regions), bottom row V->A attention renormalised over regions",
            )


def seen_unseen_confusion(logits: dict, seen_classes, unseen_classes) -> dict:
    """2x2 counts of (true seen/unseen) x (GZSL prediction seen/unseen) and the two error fractions."""
    unseen = np.asarray(unseen_classes)
    pred_s = gzsl_predictions(logits["seen"]["logits"])
    pred_u = gzsl_predictions(logits["unseen"]["logits"])
    s_to_u = int(np.isin(pred_s, unseen).sum())
    u_to_u = int(np.isin(pred_u, unseen).sum())
    n_s, n_u = int(pred_s.size), int(pred_u.size)
    return {
        "counts": [[n_s - s_to_u, s_to_u], [n_u - u_to_u, u_to_u]],  # rows: true seen, true unseen
        "seen_predicted_unseen": s_to_u / n_s if n_s else 0.0,
        "unseen_predicted_seen": (n_u - u_to_u) / n_u if n_u else 0.0,
    }


def confusion_markdown(conf: dict) -> str:
    (ss, su), (us, uu) = conf["counts"]
    return (
        "| true \\ predicted | seen class | unseen class |\n|---|---|---|\n"
        f"| seen (test_seen) | {ss} | {su} ({100 * conf['seen_predicted_unseen']:.1f}%) |\n"
        f"| unseen (test_unseen) | {us} ({100 * conf['unseen_predicted_seen']:.1f}%) | {uu} |"
    )


class GZSLSummaryHook:
    """Writes the seen/unseen confusion (scalars + text table) and per-class accuracy histograms."""

    def __call__(self, *, model, data, step, metrics, writer):
        import tensorflow as tf

        logits = metrics.get("_logits") if isinstance(metrics, dict) else None
        if logits is None:
            raise MSDNError(
                "the GZSL TensorBoard hook needs evaluate_model(..., return_logits=True) metrics "
                "(run_training does this when eval_hooks are given)"
            )
        seen, unseen = data.seen_classes, data.unseen_classes
        conf = seen_unseen_confusion(logits, seen, unseen)
        y_s, y_u = logits["labels_seen"], logits["labels_unseen"]
        pred_s = gzsl_predictions(logits["seen"]["logits"])
        pred_u = gzsl_predictions(logits["unseen"]["logits"])
        acc_seen = list(per_class_accuracies(y_s, pred_s, seen).values())
        acc_unseen = list(per_class_accuracies(y_u, pred_u, unseen).values())
        acc_czsl = list(
            per_class_accuracies(y_u, czsl_predictions(logits["unseen"]["logits"], unseen), unseen).values()
        )
        with writer.as_default(step=int(step)):
            tf.summary.scalar(
                SCALAR_TAGS[0],
                conf["unseen_predicted_seen"],
                description="fraction of test_unseen images predicted as a seen class (GZSL)",
            )
            tf.summary.scalar(
                SCALAR_TAGS[1],
                conf["seen_predicted_unseen"],
                description="fraction of test_seen images predicted as an unseen class (GZSL)",
            )
            tf.summary.text(TEXT_TAG, confusion_markdown(conf))
            for tag, values in zip(HISTOGRAM_TAGS, (acc_seen, acc_unseen, acc_czsl)):
                if values:
                    tf.summary.histogram(tag, np.asarray(values, np.float32), buckets=20)


def make_eval_hooks(config, data, num_examples: Optional[int] = None, top_k: Optional[int] = None) -> list:
    """Hooks for ``run_training(..., eval_hooks=...)``: attention images, confusion, histograms.

    Args:
        config: the run's :class:`~msdn_tf.config.Config`; the optional keys
            ``train.tensorboard_examples`` and ``train.tensorboard_top_k`` give the
            defaults of the two arguments below when the config has them.
        data: the run's :class:`~msdn_tf.data.base.ZSLData`.
        num_examples: test images in the attention summary (default 4; 0: no images).
        top_k: attributes per image (default 4, at most K).

    Returns:
        A list of callables ``hook(model=, data=, step=, metrics=, writer=)``.
    """
    train = getattr(config, "train", None)
    if num_examples is None:
        num_examples = getattr(train, "tensorboard_examples", 4)
    if top_k is None:
        top_k = getattr(train, "tensorboard_top_k", 4)
    num_examples, top_k = int(num_examples), int(top_k)
    if num_examples < 0 or top_k < 1:
        raise MSDNError(f"TensorBoard hooks need num_examples >= 0 and top_k >= 1, got {num_examples}, {top_k}")
    hooks = [GZSLSummaryHook()]
    if num_examples > 0:
        hooks.insert(0, AttentionImageHook(data, num_examples, min(top_k, data.num_attributes)))
    return hooks
