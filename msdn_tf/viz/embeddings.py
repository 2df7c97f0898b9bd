"""Attribute-score embeddings of test images (the paper's Fig. 5).

Every image is embedded as its attribute-score vector (B, K): by default the
fused score ``w1 * scores_a2v + w2 * scores_v2a`` (the model's fusion weights; the
fused class logits are ``att @`` this vector), or either sub-net's scores. The
embeddings are written in the TensorBoard Embedding Projector format (a
checkpoint holding the embedding variable, ``metadata.tsv`` with class names and
seen/unseen, ``projector_config.pbtxt``; PCA, t-SNE and UMAP are then interactive
in TensorBoard) and as a static 2-D t-SNE figure coloured by class, seen classes
as circles and unseen as triangles. t-SNE needs scikit-learn (the ``viz`` extra:
``pip install msdn-tf[viz]``); without it the figure falls back to PCA and says so
in its title and in the log.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from msdn_tf.errors import MSDNError
from msdn_tf.viz.common import EMBEDDING_SPLITS, Names, class_colours, new_figure, save_figure, split_rows

KINDS = ("fused", "a2v", "v2a")
TENSOR_NAME = "attribute_scores"
CHECKPOINT_PREFIX = "embedding.ckpt"
METADATA_TSV = "metadata.tsv"
METADATA_COLUMNS = ("class", "split", "seen", "predicted", "correct", "row")
FIGURE_PX = (900, 760)
NO_SKLEARN_NOTE = (
    "scikit-learn is not installed, so the static figure uses PCA instead of t-SNE "
    "(pip install 'msdn-tf[viz]' or scikit-learn for t-SNE)"
)


def select_rows(data, split: str = "test", max_per_class: Optional[int] = None, seed: int = 0) -> np.ndarray:
    """Rows of ``split`` with at most ``max_per_class`` per class (a seeded, sorted subset)."""
    if split not in EMBEDDING_SPLITS:
        raise MSDNError(f"unknown split {split!r}; choose one of {', '.join(EMBEDDING_SPLITS)}")
    rows = split_rows(data, split)
    if max_per_class is None:
        return rows
    if max_per_class < 1:
        raise MSDNError(f"--max-per-class must be >= 1, got {max_per_class}")
    rng = np.random.default_rng(seed)
    labels = data.labels[rows]
    keep = []
    for c in np.unique(labels):
        mine = rows[labels == c]
        keep.append(mine if mine.size <= max_per_class else rng.choice(mine, max_per_class, replace=False))
    picked = set(np.concatenate(keep).tolist())
    return np.asarray([r for r in rows if r in picked], dtype=np.int64)  # keep the split's order


def compute_embeddings(model, data, rows, kind: str = "fused", batch_size: int = 100, progress: bool = True):
    """Attribute scores ``(n, K)`` and fused GZSL predictions ``(n,)`` of ``rows``."""
    from keras import ops

    if kind not in KINDS:
        raise MSDNError(f"unknown embedding kind {kind!r}; choose one of {', '.join(KINDS)}")
    from msdn_tf.viz.attention import attribute_scores

    rows = np.asarray(rows, dtype=np.int64)
    embeddings, predictions = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rows.size, unit="img", desc="embed", file=sys.stderr)
    for start in range(0, rows.size, batch_size):
        x = data.features.read(rows[start : start + batch_size])  # (b, R, F)
        out = model(x, training=False)
        embeddings.append(ops.convert_to_numpy(attribute_scores(out, model.fusion_weights, kind)))  # (b, K)
        predictions.append(ops.convert_to_numpy(ops.argmax(out["logits"], axis=-1)))  # (b,)
        if bar is not None:
            bar.update(len(x))
    if bar is not None:
        bar.close()
    if not embeddings:
        raise MSDNError("no images to embed")
    return np.concatenate(embeddings).astype(np.float32), np.concatenate(predictions).astype(np.int64)


def _tsv_cell(value) -> str:
    return str(value).replace("\t", " ").replace("\n", " ")


def write_projector(out_dir, embeddings: np.ndarray, metadata_rows, description: str = "") -> dict:
    """Write the Embedding Projector files into ``out_dir``.

    Files: ``embedding.ckpt-1.*`` + ``checkpoint`` (a ``tf.train.Checkpoint``
    holding the variable ``attribute_scores``), ``metadata.tsv`` (a header row,
    then one row per embedding row), ``projector_config.pbtxt``, and an event
    file (a text summary describing the embedding) so that the folder shows up
    as a run when TensorBoard's ``--logdir`` is a parent folder. Everything is
    written to a temporary folder first and moved into ``out_dir`` file by file.

    Returns:
        ``{"tensor_name", "checkpoint", "metadata", "config"}`` paths/names.
    """
    import tensorflow as tf
    from tensorboard.plugins import projector

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = list(metadata_rows)
    if len(rows) != embeddings.shape[0]:
        raise MSDNError(f"{len(rows)} metadata rows for {embeddings.shape[0]} embeddings")
    stage = Path(tempfile.mkdtemp(prefix=".projector.", dir=out_dir))
    try:
        var = tf.Variable(embeddings, name=TENSOR_NAME)
        ckpt = tf.train.Checkpoint(**{TENSOR_NAME: var})
        saved = ckpt.write(str(stage / f"{CHECKPOINT_PREFIX}-1"))
        # The checkpoint state file, with a path relative to its folder (TensorBoard finds it there).
        with open(stage / "checkpoint", "w") as f:
            f.write(
                f'model_checkpoint_path: "{CHECKPOINT_PREFIX}-1"\nall_model_checkpoint_paths: "{CHECKPOINT_PREFIX}-1"\n'
            )
        tensor_name = f"{TENSOR_NAME}/.ATTRIBUTES/VARIABLE_VALUE"
        with open(stage / METADATA_TSV, "w", encoding="utf-8") as f:
            f.write("\t".join(METADATA_COLUMNS) + "\n")
            for row in rows:
                f.write("\t".join(_tsv_cell(v) for v in row) + "\n")
        config = projector.ProjectorConfig()
        emb = config.embeddings.add()
        emb.tensor_name = tensor_name
        emb.metadata_path = METADATA_TSV
        projector.visualize_embeddings(str(stage), config)
        writer = tf.summary.create_file_writer(str(stage))
        with writer.as_default(step=0):
            tf.summary.text("projector/description", description or "attribute-score embeddings")
        writer.close()
        # Old checkpoint/event files of a previous run into the same folder would confuse TensorBoard.
        for old in list(out_dir.glob(f"{CHECKPOINT_PREFIX}-*")) + list(out_dir.glob("events.out.tfevents.*")):
            old.unlink()
        for item in sorted(stage.iterdir(), key=lambda p: p.name == "checkpoint"):  # state file last
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {
        "tensor_name": tensor_name,
        "checkpoint": str(out_dir / Path(saved).name),
        "metadata": str(out_dir / METADATA_TSV),
        "config": str(out_dir / "projector_config.pbtxt"),
    }


def _import_tsne():
    from sklearn.manifold import TSNE

    return TSNE


def project_2d(embeddings: np.ndarray, method: str = "auto", seed: int = 0, log=print) -> tuple:
    """2-D coordinates by t-SNE (scikit-learn) or PCA; returns ``(xy (n, 2), label of the method)``."""
    x = np.asarray(embeddings, dtype=np.float64)
    if method not in ("auto", "tsne", "pca"):
        raise MSDNError(f"unknown projection {method!r}; choose auto, tsne or pca")
    if method in ("auto", "tsne") and x.shape[0] >= 5:
        try:
            TSNE = _import_tsne()
        except ImportError:
            if method == "tsne":
                raise MSDNError("t-SNE needs scikit-learn: pip install 'msdn-tf[viz]' (or use --method pca)") from None
            log(f"note: {NO_SKLEARN_NOTE}")
            return _pca(x), "PCA (scikit-learn not installed: no t-SNE)"
        perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3.0)))
        log(
            f"t-SNE of {x.shape[0]} points in {x.shape[1]} dimensions (minutes for thousands of points on "
            "a small CPU; --max-per-class makes it faster)"
        )
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        return tsne.fit_transform(x), f"t-SNE (perplexity {perplexity:g})"
    if method != "pca":
        log("note: fewer than 5 images, using PCA instead of t-SNE")
    return _pca(x), "PCA"


def _pca(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=0, keepdims=True)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1]))) if xy.shape[1] < 2 else xy


def render_scatter(xy: np.ndarray, labels: np.ndarray, names: Names, title: str):
    """Scatter plot coloured by class; seen classes as circles, unseen as triangles."""
    fig = new_figure(*FIGURE_PX)
    ax = fig.add_axes([0.06, 0.06, 0.62 if _legend_classes(labels) else 0.9, 0.86])
    classes = np.unique(labels)
    colours = class_colours(classes.size)
    for colour, c in zip(colours, classes):
        info = names.class_info(c)
        mask = labels == c
        ax.scatter(
            xy[mask, 0],
            xy[mask, 1],
            s=16,
            color=colour,
            marker="o" if info["seen"] else "^",
            edgecolors="black" if not info["seen"] else "none",
            linewidths=0.4,
            label=f"{info['name']} ({'seen' if info['seen'] else 'unseen'})",
        )
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if _legend_classes(labels):
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6, frameon=False, ncol=1 if classes.size <= 30 else 2
        )
    else:
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], marker="o", linestyle="", color="grey", label="seen class"),
            Line2D([], [], marker="^", linestyle="", color="grey", markeredgecolor="black", label="unseen class"),
        ]
        ax.legend(handles=handles, loc="best", fontsize=7)
    return fig


def _legend_classes(labels) -> bool:
    return np.unique(labels).size <= 60


def embed_split(
    model,
    data,
    names: Names,
    out_dir,
    split: str = "test",
    max_per_class: Optional[int] = None,
    kind: str = "fused",
    method: str = "auto",
    seed: int = 0,
    batch_size: int = 100,
    progress: bool = True,
    log=print,
) -> dict:
    """Compute the embeddings of a split and write the projector files and the static figure.

    Returns:
        A JSON-ready summary with the paths written and the sizes.
    """
    rows = select_rows(data, split, max_per_class, seed)
    log(f"embedding {rows.size} images of split '{split}' ({kind} attribute scores, K={model.num_attributes})")
    emb, pred = compute_embeddings(model, data, rows, kind, batch_size, progress)
    labels = data.labels[rows]
    split_of = {int(r): s for s in ("trainval", "test_seen", "test_unseen") for r in getattr(data, f"{s}_loc")}
    meta = []
    for r, y, p in zip(rows, labels, pred):
        info = names.class_info(y)
        meta.append(
            (
                info["name"],
                split_of.get(int(r), "?"),
                "seen" if info["seen"] else "unseen",
                names.class_names[int(p)],
                int(p == y),
                int(r),
            )
        )
    w1, w2 = model.fusion_weights
    what = {
        "fused": f"fused attribute scores {w1:g}*A->V + {w2:g}*V->A",
        "a2v": "A->V attribute scores",
        "v2a": "V->A attribute scores",
    }[kind]
    files = write_projector(out_dir, emb, meta, description=f"{what} of {rows.size} '{split}' images")
    xy, method_label = project_2d(emb, method, seed, log)
    title = f"{method_label} of {what}\n{rows.size} '{split}' images; o seen class, ^ unseen class"
    fig_path = Path(out_dir) / ("tsne.png" if method_label.startswith("t-SNE") else "pca.png")
    save_figure(render_scatter(xy, labels, names, title), fig_path)
    return {
        "split": split,
        "images": int(rows.size),
        "classes": int(np.unique(labels).size),
        "kind": kind,
        "dimension": int(emb.shape[1]),
        "projection": method_label,
        "figure": str(fig_path),
        **files,
        "tensorboard": f"tensorboard --logdir {Path(out_dir)}  (Projector tab)",
    }
