"""A seeded synthetic zero-shot dataset that needs no downloads.

What it models:

* C classes with continuous attribute vectors; the last ``num_unseen`` (after a
  seeded shuffle) are unseen. Unseen classes are new combinations of attributes
  that also occur in seen classes, so knowledge transfers through attributes.
* Each attribute k has a sparse, non-negative visual pattern ``P_k`` (F,).
* Each image is an ``H x W`` grid of regions. The object covers a random
  rectangle; its regions carry an "object" pattern and the class's attributes,
  each present attribute placed in one or two object regions with a strength
  given by the class attribute value. Background regions hold non-negative
  clutter and, with probability ``distractors``, the pattern of a random
  attribute that the class need not have. Global average pooling mixes the
  distractors in; attention to the object regions separates them.
* Attribute word vectors are a fixed random linear map of the patterns plus
  noise, so they relate to what the attribute looks like.

The generator writes the reference feature-map HDF5 layout (docs/reference.md
§1.1, channel-first maps) and the demo is read back through the same loader as
real data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from msdn_tf.config import DemoConfig
from msdn_tf.data.hdf5 import write_feature_map_hdf5

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "grey")
PARTS = ("head", "wing", "tail", "leg", "belly", "back", "crown", "eye")


def attribute_names(k: int) -> list:
    """Readable names such as ``has_wing_color::blue`` for the demo's attributes."""
    names = []
    for i in range(k):
        part = PARTS[i % len(PARTS)]
        colour = COLOURS[(i // len(PARTS)) % len(COLOURS)]
        suffix = "" if i < len(PARTS) * len(COLOURS) else f"_{i}"
        names.append(f"has_{part}_color::{colour}{suffix}")
    return names


def generate_demo_arrays(cfg: DemoConfig) -> dict:
    """Generate the demo dataset in memory.

    Args:
        cfg: sizes and seed (:class:`msdn_tf.config.DemoConfig`).

    Returns:
        dict with the keys of :func:`msdn_tf.data.hdf5.write_feature_map_hdf5`.
    """
    rng = np.random.default_rng(cfg.seed)
    _check_demo_config(cfg)
    att, seen, unseen = _class_attributes(rng, cfg)
    patterns, object_code = _visual_codes(rng, cfg.num_attributes, cfg.feature_dim)
    w2v = _word_vectors(rng, patterns, cfg.embed_dim)
    labels = np.repeat(np.arange(cfg.num_classes), cfg.images_per_class)
    maps = np.empty((labels.shape[0], cfg.feature_dim, cfg.map_size, cfg.map_size), dtype=np.float32)
    for n in range(labels.shape[0]):
        maps[n] = _image_map(rng, cfg, att[labels[n]], patterns, object_code)
    return {
        "feature_map": maps,
        "labels": labels,
        **make_splits(rng, labels, seen, unseen, cfg.test_seen_fraction),
        "att": att,
        "original_att": att * 100.0,
        "w2v_att": w2v,
        "class_names": [f"{'unseen' if c in unseen else 'seen'}_class_{c:02d}" for c in range(cfg.num_classes)],
        "attribute_names": attribute_names(cfg.num_attributes),
    }


def _check_demo_config(cfg: DemoConfig) -> None:
    """The demo needs at least one seen and one unseen class and 1..K attributes per class."""
    C, K = cfg.num_classes, cfg.num_attributes
    if cfg.num_unseen >= C or cfg.num_unseen < 1:
        raise ValueError(f"demo.num_unseen must be in [1, {C - 1}], got {cfg.num_unseen}")
    if not 1 <= cfg.attributes_per_class <= K:
        raise ValueError(f"demo.attributes_per_class must be in [1, {K}]")
    if cfg.map_size < 3:
        raise ValueError(f"demo.map_size must be >= 3 (the object box spans up to 3 x 3 regions), got {cfg.map_size}")


def _class_attributes(rng, cfg: DemoConfig):
    """``(att (C, K), seen, unseen)``: a few strong attributes per class, weak noise elsewhere.

    Every attribute is made strong in at least one seen class, so it can be learnt.
    """
    C, K = cfg.num_classes, cfg.num_attributes
    att = rng.uniform(0.0, 0.1, size=(C, K))
    for c in range(C):
        present = rng.choice(K, size=cfg.attributes_per_class, replace=False)
        att[c, present] = rng.uniform(0.5, 1.0, size=cfg.attributes_per_class)
    order = rng.permutation(C)
    unseen = np.sort(order[: cfg.num_unseen])
    seen = np.sort(order[cfg.num_unseen :])
    missing = np.where(att[seen].max(axis=0) < 0.5)[0]
    for k in missing:
        att[rng.choice(seen), k] = rng.uniform(0.5, 1.0)
    return att, seen, unseen


def _visual_codes(rng, K: int, F: int):
    """``(patterns (K, F), object_code (F,))``: sparse non-negative codes of the attributes and the object."""
    active = max(4, F // 16)
    patterns = np.zeros((K, F))
    for k in range(K):
        idx = rng.choice(F, size=active, replace=False)
        patterns[k, idx] = rng.uniform(0.5, 1.5, size=active)
    object_code = np.zeros(F)
    object_code[rng.choice(F, size=active, replace=False)] = rng.uniform(0.5, 1.0, size=active)
    return patterns, object_code


def _word_vectors(rng, patterns, D: int):
    """``(K, D)`` word vectors related to the visual patterns: a random projection plus noise."""
    F = patterns.shape[1]
    projection = rng.normal(size=(D, F)) / np.sqrt(F)
    w2v = patterns @ projection.T
    w2v += rng.normal(scale=0.3 * np.abs(w2v).mean(), size=w2v.shape)
    return w2v


def _image_map(rng, cfg: DemoConfig, class_att, patterns, object_code):
    """One image's ``(F, H, W)`` map: clutter, an object box carrying the class's attributes, distractors."""
    H = W = cfg.map_size
    R, F, K = H * W, patterns.shape[1], patterns.shape[0]
    region = np.abs(rng.normal(scale=0.25, size=(R, F)))  # clutter everywhere
    h0, w0 = rng.integers(0, H - 2), rng.integers(0, W - 2)
    h1, w1 = min(H, h0 + rng.integers(3, 5)), min(W, w0 + rng.integers(3, 5))
    obj = np.array([h * W + w for h in range(h0, h1) for w in range(w0, w1)])
    background = np.setdiff1d(np.arange(R), obj)
    region[obj] += object_code
    for k in np.where(class_att >= 0.5)[0]:
        if rng.random() < 0.9:
            where = rng.choice(obj, size=rng.integers(1, 3), replace=False)
            region[where] += class_att[k] * patterns[k] * rng.uniform(0.8, 1.2)
    for r in background:
        if rng.random() < cfg.distractors:
            region[r] += rng.uniform(0.6, 1.0) * patterns[rng.integers(K)]
    return region.T.reshape(F, H, W)


def make_splits(rng, labels, seen, unseen, test_seen_fraction: float) -> dict:
    """trainval / test_seen from the seen classes (``test_seen_fraction`` of each, at least one
    image, and at least one left for trainval), test_unseen = all unseen images, and a
    class-disjoint train/val split of the seen classes (the role of xlsa17 train_loc/val_loc).
    The demo and the input-pipeline benchmark's synthetic dataset
    (:func:`msdn_tf.perf.input_pipeline.synthetic_data`) split with it."""
    trainval, test_seen = [], []
    for c in seen:
        rows = rng.permutation(np.where(labels == c)[0])
        n_test = min(rows.size - 1, max(1, int(round(test_seen_fraction * rows.size))))
        test_seen.extend(rows[:n_test])
        trainval.extend(rows[n_test:])
    test_unseen = np.where(np.isin(labels, unseen))[0]
    val_classes = rng.choice(seen, size=max(1, len(seen) // 5), replace=False)
    trainval = np.sort(np.asarray(trainval))
    return {
        "trainval_loc": trainval,
        "test_seen_loc": np.sort(np.asarray(test_seen)),
        "test_unseen_loc": test_unseen,
        "train_loc": trainval[~np.isin(labels[trainval], val_classes)],
        "val_loc": trainval[np.isin(labels[trainval], val_classes)],
    }


def demo_fingerprint(cfg: DemoConfig) -> str:
    """A short hash of the demo settings, used in the cache file name."""
    text = json.dumps({**cfg.__dict__, "format": 1}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def default_demo_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "msdn_tf" / "demo"


def ensure_demo_file(cfg: DemoConfig, data_dir=None) -> Path:
    """Generate the demo HDF5 file once (atomically) and return its path.

    Args:
        cfg: demo settings; files are keyed by their fingerprint.
        data_dir: folder for the file; default ``$XDG_CACHE_HOME/msdn_tf/demo``.
    """
    folder = Path(data_dir) if data_dir else default_demo_dir()
    path = folder / f"demo_{demo_fingerprint(cfg)}.hdf5"
    if not path.exists():
        arrays = generate_demo_arrays(cfg)
        write_feature_map_hdf5(path, **arrays)
    return path
