"""Figures of a run directory: what a trained MSDN attends to (library of ``python -m msdn_tf.visualize``).

:func:`visualize_attention` and :func:`visualize_embeddings` are what
``python -m msdn_tf.visualize {attention,embeddings}`` call.

Attention (the paper's Fig. 4)::

    python -m msdn_tf.visualize attention --run RUN --index 0 --split test_unseen [--top-k 6] [--out fig.png]
    python -m msdn_tf.visualize attention --run RUN --image bird.jpg [--backbone-weights imagenet|FILE|none]

writes ``fig.png`` (top-k attributes; A->V and V->A maps side by side) and
``fig.json`` (the attributes with their scores, predicted and true class), and
prints the JSON. Embeddings (the paper's Fig. 5)::

    python -m msdn_tf.visualize embeddings --run RUN [--split test] [--max-per-class 50] [--out DIR]

writes the TensorBoard Embedding Projector files and a static ``tsne.png`` (or
``pca.png`` without scikit-learn) into ``DIR`` (default ``RUN/tensorboard/embeddings_<split>``).
See ``docs/visualize.md``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from msdn_tf.errors import MSDNError
from msdn_tf.utils import write_json
from msdn_tf.viz.common import SPLITS


def _load(run_dir, need_data: bool, log=print):
    """``(config, model, data or None)``; the dataset is loaded when needed or cheaply available."""
    from msdn_tf.data.registry import load_dataset
    from msdn_tf.evaluation.runs import load_run

    config, model = load_run(run_dir)
    data = None
    try:
        data = load_dataset(config)
    except MSDNError as exc:
        if need_data:
            raise MSDNError(f"{run_dir}: cannot load the run's dataset '{config.data.dataset}' ({exc})") from exc
        log(f"note: dataset '{config.data.dataset}' not available for names ({exc})")
    if data is not None and (
        data.num_classes != model.num_classes
        or data.num_attributes != model.num_attributes
        or data.feature_dim != model.feature_dim
    ):
        raise MSDNError(
            f"{run_dir}: the dataset has C={data.num_classes}, K={data.num_attributes}, "
            f"F={data.feature_dim} but the model has C={model.num_classes}, "
            f"K={model.num_attributes}, F={model.feature_dim}"
        )
    return config, model, data


def _resolve_class(names, value) -> int:
    text = str(value)
    if text.isdigit() and int(text) < len(names.class_names):
        return int(text)
    if text in names.class_names:
        return names.class_names.index(text)
    raise MSDNError(f"--true-class {text!r}: not a class id in [0, {len(names.class_names)}) or a class name")


def visualize_attention(
    run_dir,
    image=None,
    index: Optional[int] = None,
    split: str = "test_unseen",
    top_k: int = 6,
    rank_by: str = "fused",
    out=None,
    backbone=None,
    backbone_weights: str = "imagenet",
    image_size: int = 448,
    true_class=None,
    log=print,
) -> dict:
    """Draw the attention figure of one image (file or dataset row) and write its JSON.

    Args:
        run_dir: a run directory (``config.yaml`` + ``model.keras``).
        image: an image file; needs a backbone producing the run's features.
        index: position in ``split`` (0-based) of a dataset image (features only: region grid).
        split: ``test_unseen``, ``test_seen`` or ``trainval``.
        top_k: attributes shown. rank_by: ``fused``, ``a2v`` or ``v2a`` score.
        out: the PNG path (default ``RUN/attention_<split>_<index>.png`` or
            ``RUN/attention_<image stem>.png``); the JSON goes beside it.
        backbone: an injected callable ``(1, S, S, 3) -> (1, h, w, F)``; default
            :func:`msdn_tf.backbones.keras_resnet.build_backbone` with ``backbone_weights``.
        true_class: optional class id or name of ``image`` (for the JSON and title).

    Returns:
        The JSON summary (also written to ``<out>.json``).
    """
    from msdn_tf.viz.attention import explain, load_image_features, render_attention
    from msdn_tf.viz.common import Names, map_shape_of, save_figure, split_rows

    if (image is None) == (index is None):
        raise MSDNError("give exactly one of --image FILE or --index N")
    if split not in SPLITS:
        raise MSDNError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if image is not None and not os.path.isfile(str(image)):
        raise MSDNError(f"{image}: image not found")
    config, model, data = _load(run_dir, need_data=image is None, log=log)
    names = Names.for_model(model, run_dir, data, log=log)
    if image is None:
        rows = split_rows(data, split)
        if not -rows.size <= index < rows.size:
            raise MSDNError(
                f"--index {index} is out of range: split '{split}' has {rows.size} images (0..{rows.size - 1})"
            )
        row = int(rows[index])
        features = data.features.read([row])
        expl = explain(
            model,
            features,
            names,
            top_k,
            rank_by,
            labels=data.labels[[row]],
            map_shape=map_shape_of(data),
            sources=[{"split": split, "index": int(index), "row": row}],
        )[0]
        default = Path(run_dir) / f"attention_{split}_{index}.png"
    else:
        label = None if true_class is None else [_resolve_class(names, true_class)]
        if backbone is None:
            from msdn_tf.backbones.keras_resnet import build_backbone

            log(f"building the ResNet-101 backbone (weights: {backbone_weights}, input {image_size}px)")
            backbone = build_backbone(backbone_weights, image_size)
        pixels, features = load_image_features(image, backbone, image_size)
        if features.shape[-1] != model.feature_dim:
            raise MSDNError(
                f"the backbone gives {features.shape[-1]} channels per region but the model in "
                f"{run_dir} expects {model.feature_dim}: use the backbone its features came from"
            )
        expl = explain(
            model, features, names, top_k, rank_by, labels=label, images=pixels[None], sources=[{"image": str(image)}]
        )[0]
        default = Path(run_dir) / f"attention_{Path(image).stem}.png"
    out = Path(out) if out else default
    save_figure(render_attention(expl), out)
    summary = {**expl.summary, "figure": str(out), "names_from": names.source}
    write_json(out.with_suffix(".json"), summary)
    return summary


def visualize_embeddings(
    run_dir,
    split: str = "test",
    max_per_class: Optional[int] = None,
    out=None,
    kind: str = "fused",
    method: str = "auto",
    seed: int = 0,
    progress: bool = True,
    log=print,
) -> dict:
    """Write the Embedding Projector files and the static t-SNE/PCA figure of a run's images.

    Args:
        run_dir: a run directory.
        split: ``test`` (test_seen + test_unseen), ``test_unseen``, ``test_seen`` or ``trainval``.
        max_per_class: at most this many images per class (seeded subset).
        out: output folder (default ``RUN/tensorboard/embeddings_<split>``).
        kind: ``fused``, ``a2v`` or ``v2a`` attribute scores.
        method: ``auto`` (t-SNE if scikit-learn is installed, else PCA), ``tsne`` or ``pca``.

    Returns:
        A JSON-ready summary (also written to ``<out>/embeddings.json``).
    """
    from msdn_tf.viz.common import Names
    from msdn_tf.viz.embeddings import embed_split, select_rows

    config, model, data = _load(run_dir, need_data=True, log=log)
    select_rows(data, split, max_per_class, seed)  # validate the split before any work
    out = Path(out) if out else Path(run_dir) / "tensorboard" / f"embeddings_{split}"
    summary = embed_split(
        model,
        data,
        Names.from_data(data),
        out,
        split,
        max_per_class,
        kind,
        method,
        seed,
        config.data.eval_batch_size,
        progress,
        log,
    )
    write_json(out / "embeddings.json", summary)
    return summary


def attention_text(summary: dict) -> str:
    """A few readable lines of :func:`visualize_attention`'s summary (what the command prints without --json).

    Example:
        >>> print(attention_text(summary))
        predicted: 013.Bobolink (class 12, unseen), logit 3.21; true: 013.Bobolink (correct)
    """

    def cls(info):
        return f"{info['name']} (class {info['id']}, {'seen' if info['seen'] else 'unseen'})"

    lines = [f"predicted: {cls(summary['predicted_class'])}, logit {summary['predicted_class']['logit']:.3f}"]
    if summary.get("true_class") is not None:
        lines[0] += f"; true: {cls(summary['true_class'])} ({'correct' if summary['correct'] else 'wrong'})"
    lines.append("top classes: " + ", ".join(f"{c['name']} {c['logit']:.3f}" for c in summary["top_classes"]))
    lines.append(f"top attributes ({summary['score_definition']}):")
    lines += [f"  {a['rank']}. {a['name']}  {a['score']:.4f}" for a in summary["top_attributes"]]
    lines.append(f"figure: {summary['figure']} (all figures: {Path(summary['figure']).with_suffix('.json')})")
    return "\n".join(lines)


def embeddings_text(summary: dict) -> str:
    """A few readable lines of :func:`visualize_embeddings`'s summary (what the command prints without --json)."""
    return "\n".join(
        [
            f"{summary['images']} images of {summary['classes']} classes ({summary['split']}), "
            f"{summary['kind']} scores, {summary['dimension']} dimensions, {summary['projection']}",
            f"figure: {summary['figure']}",
            f"projector: {summary['tensorboard']}",
        ]
    )
