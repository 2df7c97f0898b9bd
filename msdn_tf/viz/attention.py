"""Top-k attributes of an image and where each sub-net looks for them (the paper's Fig. 4).

For one image, attributes are ranked by an attribute score (by default the fused
score ``w1 * scores_a2v + w2 * scores_v2a`` with the model's test-time fusion
weights: the class logits are ``att @`` this vector, so it is the attribute
evidence behind the fused prediction). For each of the top-k attributes ``k``:

* **A->V map**: ``attention_a2v[k]`` over the regions. Attribute ``k`` attends over
  the regions with a softmax, so the map sums to 1 over regions.
* **V->A map**: ``attention_v2a[k, :]``: for every region, the weight that region
  gives to attribute ``k`` (each region's softmax over attributes). The raw values
  do not sum to 1 over regions; for display the map is renormalised to sum to 1
  over regions, so both rows are distributions over regions.

Each panel's colour scale runs from 0 to that panel's maximum. With an image the
maps are upsampled bilinearly to the image and overlaid; with features only
(a dataset row) they are drawn on the region grid.

Reference:
    Chen et al., "MSDN", CVPR 2022, Fig. 4; docs/reference.md §3 (attention axes of the code).
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Optional

import numpy as np

from msdn_tf.errors import DataError, MSDNError
from msdn_tf.viz.common import Names, new_figure, region_grid

RANK_BY = ("fused", "a2v", "v2a")
PANEL_PX = (200, 230)  # width, height of one map panel at dpi 100
HEADER_PX = 60


@dataclasses.dataclass
class AttentionExplanation:
    """The top-k attributes of one image and their maps.

    Attributes:
        summary: JSON-ready dict: predicted/true class, top attributes with scores.
        a2v: ``(k, H, W)`` A->V attention (sums to 1 over regions).
        v2a: ``(k, H, W)`` V->A attention to each attribute, renormalised over regions.
        v2a_raw: ``(k, H, W)`` V->A attention as the model gives it (each region's share).
        context: ``(H, W)`` L2 norm of each region's feature vector (shown without an image).
        image: optional ``(S, S, 3)`` uint8 image the features came from.
    """

    summary: dict
    a2v: np.ndarray
    v2a: np.ndarray
    v2a_raw: np.ndarray
    context: np.ndarray
    image: Optional[np.ndarray] = None


# --------------------------------------------------------------------------- numerics
def attribute_scores(outputs: dict, fusion_weights, rank_by: str = "fused"):
    """``(B, K)`` attribute scores used for ranking: fused, A->V or V->A."""
    from keras import ops

    if rank_by not in RANK_BY:
        raise MSDNError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
    a2v, v2a = outputs["scores_a2v"], outputs["scores_v2a"]  # (B, K)
    if rank_by == "a2v":
        return ops.convert_to_tensor(a2v)
    if rank_by == "v2a":
        return ops.convert_to_tensor(v2a)
    w1, w2 = (float(w) for w in fusion_weights)
    return w1 * a2v + w2 * v2a


def select_attention(outputs: dict, fusion_weights, top_k: int = 6, rank_by: str = "fused") -> dict:
    """Top-k attributes per image and both sub-nets' maps for them.

    Args:
        outputs: :class:`~msdn_tf.model.MSDN` outputs for a batch.
        fusion_weights: ``(w1, w2)`` for the fused score.
        top_k: attributes per image (at most K).
        rank_by: ``fused``, ``a2v`` or ``v2a``.

    Returns:
        NumPy dict: ``indices`` (B, k); ``score`` (ranking score), ``score_fused``,
        ``score_a2v``, ``score_v2a`` (B, k); ``a2v`` (B, k, R) summing to 1 over
        regions; ``v2a_raw`` (B, k, R) the V->A weights of attribute k in every
        region; ``v2a`` (B, k, R) the same renormalised over regions.
    """
    from keras import ops

    ranking = attribute_scores(outputs, fusion_weights, rank_by)  # (B, K)
    fused = attribute_scores(outputs, fusion_weights, "fused")  # (B, K)
    K = int(ranking.shape[-1])
    if top_k < 1:
        raise MSDNError(f"top_k must be >= 1, got {top_k}")
    k = min(int(top_k), K)
    score, idx = ops.top_k(ranking, k)  # (B, k)
    att_a2v = ops.convert_to_tensor(outputs["attention_a2v"])  # (B, K, R)
    att_v2a = ops.convert_to_tensor(outputs["attention_v2a"])  # (B, K, R)
    B, R = att_a2v.shape[0], att_a2v.shape[2]
    gather = ops.broadcast_to(ops.expand_dims(idx, -1), (B, k, R))  # (B, k, R)
    a2v = ops.take_along_axis(att_a2v, gather, axis=1)  # (B, k, R)
    v2a_raw = ops.take_along_axis(att_v2a, gather, axis=1)  # (B, k, R)
    v2a = v2a_raw / ops.maximum(ops.sum(v2a_raw, axis=-1, keepdims=True), 1e-12)  # (B, k, R)

    def pick(values):
        return ops.convert_to_numpy(ops.take_along_axis(ops.convert_to_tensor(values), idx, axis=1))

    return {
        "indices": ops.convert_to_numpy(idx),
        "score": ops.convert_to_numpy(score),
        "score_fused": pick(fused),
        "score_a2v": pick(outputs["scores_a2v"]),
        "score_v2a": pick(outputs["scores_v2a"]),
        "a2v": ops.convert_to_numpy(a2v),
        "v2a_raw": ops.convert_to_numpy(v2a_raw),
        "v2a": ops.convert_to_numpy(v2a),
    }


def upsample(maps: np.ndarray, size) -> np.ndarray:
    """Bilinear upsampling of ``(k, H, W)`` maps to ``(k, size_h, size_w)``."""
    from keras import ops

    maps = np.asarray(maps, dtype=np.float32)
    x = ops.convert_to_tensor(maps[..., None])  # (k, H, W, 1)
    y = ops.image.resize(x, (int(size[0]), int(size[1])), interpolation="bilinear")  # (k, S, S, 1)
    return ops.convert_to_numpy(y)[..., 0]


# --------------------------------------------------------------------------- explanations
def _top_attribute_rows(sel: dict, b: int, names: Names, att: np.ndarray, pred: int, true, W: int) -> list:
    """One summary row per selected attribute of image ``b``: scores, peak regions, class attribute values."""
    rows = []
    for i, k in enumerate(sel["indices"][b]):
        k = int(k)
        entry = {
            "rank": i + 1,
            "id": k,
            "name": names.attribute_names[k],
            "score": float(sel["score"][b, i]),
            "score_fused": float(sel["score_fused"][b, i]),
            "score_a2v": float(sel["score_a2v"][b, i]),
            "score_v2a": float(sel["score_v2a"][b, i]),
            "a2v_peak_region": _peak(sel["a2v"][b, i], W),
            "v2a_peak_region": _peak(sel["v2a"][b, i], W),
            "class_attribute_predicted": float(att[pred, k]),
        }
        if true is not None:
            entry["class_attribute_true"] = float(att[true, k])
        rows.append(entry)
    return rows


def explain(
    model,
    features,
    names: Names,
    top_k: int = 6,
    rank_by: str = "fused",
    labels=None,
    map_shape=None,
    images=None,
    sources=None,
) -> list:
    """Run the model on ``features`` and build one :class:`AttentionExplanation` per image.

    Args:
        model: an :class:`~msdn_tf.model.MSDN`.
        features: ``(B, R, F)`` or ``(B, H, W, F)`` channel-last features.
        names: class and attribute names (:class:`~msdn_tf.viz.common.Names`).
        top_k, rank_by: see :func:`select_attention`.
        labels: optional ``(B,)`` true class ids.
        map_shape: ``(H, W)`` of the region grid (default from 4-D features or ``sqrt(R)``).
        images: optional ``(B, S, S, 3)`` uint8 images for overlays.
        sources: optional per-image dicts merged into each summary (row, split, image path).
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim == 4:
        map_shape = map_shape or features.shape[1:3]
        features = features.reshape(features.shape[0], -1, features.shape[-1])
    if features.ndim != 3:
        raise DataError(f"features must be (B, R, F) or (B, H, W, F), got shape {features.shape}")
    if features.shape[-1] != model.feature_dim:
        raise DataError(f"features have {features.shape[-1]} channels but the model expects {model.feature_dim}")
    B, R, _ = features.shape
    H, W = region_grid(R, map_shape)
    outputs = model(features, training=False)
    sel = select_attention(outputs, model.fusion_weights, top_k, rank_by)
    logits = np.asarray(outputs["logits"])  # (B, C)
    att = np.asarray(model.embedding.att)  # (C, K)
    context = np.linalg.norm(features, axis=-1).reshape(B, H, W)
    out = []
    for b in range(B):
        order = np.argsort(-logits[b])
        pred = int(order[0])
        true = None if labels is None else int(labels[b])
        attributes = _top_attribute_rows(sel, b, names, att, pred, true, W)
        summary = dict(sources[b]) if sources is not None else {}
        summary.update(
            {
                "predicted_class": {**names.class_info(pred), "logit": float(logits[b, pred])},
                "true_class": None if true is None else names.class_info(true),
                "correct": None if true is None else bool(pred == true),
                "top_classes": [{**names.class_info(c), "logit": float(logits[b, c])} for c in order[:3]],
                "rank_by": rank_by,
                "score_definition": _score_definition(rank_by, model.fusion_weights),
                "fusion_weights": [float(w) for w in model.fusion_weights],
                "region_grid": [H, W],
                "top_attributes": attributes,
            }
        )
        out.append(
            AttentionExplanation(
                summary=summary,
                a2v=sel["a2v"][b].reshape(-1, H, W),
                v2a=sel["v2a"][b].reshape(-1, H, W),
                v2a_raw=sel["v2a_raw"][b].reshape(-1, H, W),
                context=context[b],
                image=None if images is None else np.asarray(images[b]),
            )
        )
    return out


def _peak(values, width) -> list:
    r = int(np.argmax(values))
    return [r // width, r % width]


def _score_definition(rank_by, fusion_weights) -> str:
    w1, w2 = (float(w) for w in fusion_weights)
    return {
        "fused": f"{w1:g} * A->V score + {w2:g} * V->A score (the model's test-time fusion weights)",
        "a2v": "A->V attribute score (sum over regions of attention x region-attribute score)",
        "v2a": "V->A attribute score (sum over regions of attention x region-attribute score)",
    }[rank_by]


def load_image_features(image_path, backbone, image_size: int = 448):
    """Load one image the way ``msdn_tf.extract`` does and run the backbone on it.

    Args:
        image_path: an image file (anything ``tf.io.decode_image`` reads).
        backbone: callable ``(1, S, S, 3) -> (1, h, w, F)`` taking
            ``keras.applications.resnet.preprocess_input`` images (see
            :func:`msdn_tf.backbones.keras_resnet.build_backbone`).
        image_size: square input size (448 gives 14x14 ResNet-101 maps).

    Returns:
        ``(image (S, S, 3) uint8, features (1, h, w, F) float32)``.
    """
    import os

    import keras
    import tensorflow as tf

    from msdn_tf.backbones.keras_resnet import call_backbone, load_image

    path = str(image_path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: image not found")
    try:
        image = load_image(tf.constant(path), int(image_size))  # (S, S, 3) float 0..255
    except (tf.errors.OpError, ValueError) as exc:
        msg = getattr(exc, "message", str(exc)).strip().splitlines()[0]
        raise DataError(f"{path}: cannot read or decode the image ({msg})") from exc
    x = keras.applications.resnet.preprocess_input(image[None])  # (1, S, S, 3)
    feats = np.asarray(keras.ops.convert_to_numpy(call_backbone(backbone, x)), dtype=np.float32)
    if feats.ndim != 4 or feats.shape[0] != 1:
        raise MSDNError(f"the backbone must return (1, h, w, channels) for one image, got {feats.shape}")
    return np.asarray(image.numpy().round(), dtype=np.uint8), feats


# --------------------------------------------------------------------------- figures
def figure_size(top_k: int, scale: float = 1.0) -> tuple:
    """``(width_px, height_px)`` of :func:`render_attention` for ``top_k`` attributes."""
    w, h = PANEL_PX
    return int(round((top_k + 1) * w * scale)), int(round((2 * h + HEADER_PX) * scale))


def render_attention(expl: AttentionExplanation, scale: float = 1.0, alpha: float = 0.5):
    """Draw the Fig. 4-style panel grid of one explanation on a headless matplotlib Figure.

    Layout: column 0 the image (or each region's feature norm) and the prediction;
    then one column per top attribute: top row the A->V map, bottom row the V->A
    map (renormalised over regions). Size: :func:`figure_size` pixels.
    """
    s = expl.summary
    k = expl.a2v.shape[0]
    width, height = figure_size(k, scale)
    fig = new_figure(width, height, dpi=int(round(100 * scale)))
    fs = 7
    axes = fig.subplots(2, k + 1, squeeze=False)
    fig.subplots_adjust(
        left=0.01,
        right=0.99,
        bottom=0.01,
        top=1 - (HEADER_PX + 2) / (2 * PANEL_PX[1] + HEADER_PX),
        wspace=0.06,
        hspace=0.32,
    )
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])

    pred, true = s["predicted_class"], s.get("true_class")
    how = {"fused": "fused score", "a2v": "A->V score", "v2a": "V->A score"}[s["rank_by"]]
    fig.suptitle(
        f"top-{k} attributes by {how} ({s['score_definition']})\n"
        "top row: A->V attention (softmax over regions); bottom row: V->A attention to the attribute, "
        "renormalised over regions; colour 0..panel max",
        fontsize=fs,
        y=0.995,
        va="top",
    )

    ax = axes[0, 0]
    if expl.image is not None:
        ax.imshow(expl.image)
        ax.set_title("input image", fontsize=fs)
    else:
        ax.imshow(expl.context, cmap="gray", interpolation="nearest")
        ax.set_title(f"region feature norm\n({expl.context.shape[0]}x{expl.context.shape[1]} grid)", fontsize=fs)
    ax = axes[1, 0]
    ax.axis("off")
    lines = [
        f"predicted: {_short(pred['name'])}",
        f"  ({'seen' if pred['seen'] else 'unseen'}, logit {pred['logit']:.3g})",
    ]
    if true is not None:
        lines += [
            f"true: {_short(true['name'])}",
            f"  ({'seen' if true['seen'] else 'unseen'})",
            "correct" if s.get("correct") else "wrong",
        ]
    if s.get("row") is not None:
        lines.append(f"row {s['row']} ({s.get('split')})")
    ax.text(0.02, 0.98, "\n".join(lines), fontsize=fs, va="top", ha="left", transform=ax.transAxes)

    up_a2v = up_v2a = None
    if expl.image is not None:
        size = expl.image.shape[:2]
        up_a2v, up_v2a = upsample(expl.a2v, size), upsample(expl.v2a, size)
    for i, attr in enumerate(s["top_attributes"]):
        for row, (maps, up, label) in enumerate(((expl.a2v, up_a2v, "A->V"), (expl.v2a, up_v2a, "V->A"))):
            ax = axes[row, i + 1]
            if up is not None:
                ax.imshow(expl.image)
                ax.imshow(up[i], cmap="jet", alpha=alpha, vmin=0.0, vmax=max(float(up[i].max()), 1e-12))
            else:
                ax.imshow(
                    maps[i], cmap="viridis", interpolation="nearest", vmin=0.0, vmax=max(float(maps[i].max()), 1e-12)
                )
            score = attr["score_a2v"] if label == "A->V" else attr["score_v2a"]
            title = f"{label} score {score:.3g}, max {float(maps[i].max()):.2f}"
            if row == 0:
                title = f"#{attr['rank']} {_short(attr['name'], 30)}\nfused {attr['score_fused']:.3g} | " + title
            ax.set_title(title, fontsize=fs - 1)
    return fig


def _short(name: str, width: int = 26) -> str:
    return textwrap.shorten(str(name), width=width, placeholder="...")
