"""The in-memory description of a zero-shot dataset, shared by every reader.

A reader (HDF5 feature maps, xlsa17 files, the demo generator, a user's own
data) returns a :class:`ZSLData`. Everything downstream (samplers, tf.data,
training, evaluation, export) only sees this object, so a new data source is a
new reader, never a new training path.

Features are not held in memory: ``ZSLData.features`` is a
:class:`FeatureSource`, which reads rows on demand as channel-last region
vectors ``(n, R, F)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np

from msdn_tf.errors import DataError


def check_data_dir(data_dir) -> Path:
    """``data_dir`` as a Path; a :class:`DataError` if it names a file rather than a folder."""
    folder = Path(data_dir)
    if folder.exists() and not folder.is_dir():
        raise DataError(
            f"--data-dir {folder}: is a file, not a directory; pass the folder that holds the dataset's files"
        )
    return folder


class FeatureSource(Protocol):
    """Random access to per-image feature maps.

    ``shape`` is ``(N, R, F)``: images, regions (row-major over the map), channels.
    ``read(indices)`` returns ``float32`` of shape ``(len(indices), R, F)`` in the
    order of ``indices``. Values are raw backbone activations or already
    per-region L2-normalised ones: the model normalises every region anyway.
    """

    shape: tuple

    def read(self, indices: np.ndarray) -> np.ndarray:  # pragma: no cover - protocol
        ...


def check_feature_dtype(dtype, where: str) -> None:
    """Refuse feature values that are not real numbers, naming ``where`` (file and key).

    Floats and integers (quantised activations) are accepted. Booleans are refused too:
    backbone activations are never booleans, so a boolean array is a wrong key or file
    (training on 0/1 maps would run and mean nothing). Strings, objects and complex
    numbers are refused.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "fiu":
        return
    what = {
        "b": "booleans (activations are never booleans: is this the right file or key?)",
        "c": "complex numbers",
        "U": "strings",
        "S": "strings",
        "O": "Python objects",
        "V": "records (a compound type)",
    }.get(dtype.kind, str(dtype))
    raise DataError(f"{where}: feature values must be real numbers (float or integer), got {what} ({dtype})")


class ArrayFeatures:
    """A :class:`FeatureSource` over an array already in memory (tests, small data).

    Args:
        array: ``(N, R, F)`` array (any float dtype; returned as float32).
    """

    def __init__(self, array: np.ndarray):
        array = np.asarray(array)
        if array.ndim != 3:
            raise DataError(f"feature array must be (N, R, F), got shape {array.shape}")
        check_feature_dtype(array.dtype, "feature array")
        self.array = array
        self.shape = tuple(array.shape)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[np.asarray(indices)], dtype=np.float32)


def feature_file(features, fallback: str = "<memory>") -> str:
    """The file a :class:`FeatureSource` reads (``path`` attribute), or ``fallback``."""
    return str(getattr(features, "path", None) or fallback)


def nonfinite_rows(features, rows, chunk: int = 256) -> np.ndarray:
    """The rows among ``rows`` whose feature map holds a NaN or inf (sorted, unique).

    Reads ``chunk`` rows at a time, so memory stays bounded. Used to name the rows of a
    feature file once a batch or an evaluation turned non-finite.
    """
    rows = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
    bad = []
    for start in range(0, rows.size, chunk):
        part = rows[start : start + chunk]
        x = np.asarray(features.read(part))
        bad.append(part[~np.isfinite(x.reshape(part.size, -1)).all(axis=1)])
    return np.concatenate(bad) if bad else rows[:0]


def describe_rows(rows, limit: int = 10) -> str:
    rows = [int(r) for r in rows]
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"row{'s' if len(rows) != 1 else ''} {', '.join(map(str, rows[:limit]))}{more}"


def class_attributes_for_model(att_ck: np.ndarray, nonnegative: bool = False) -> np.ndarray:
    """Class-attribute matrix as the reference model uses it (docs/reference.md §1.4).

    Args:
        att_ck: ``(C, K)`` class attributes (xlsa17 ``att`` transposed).
        nonnegative: set negative entries to 0 first (the reference does this for AWA2).

    Returns:
        ``(C, K)`` float32 with every row L2-normalised (eps 1e-12).
    """
    att = np.asarray(att_ck, dtype=np.float64)
    if nonnegative:
        att = np.maximum(att, 0.0)
    norm = np.maximum(np.linalg.norm(att, axis=1, keepdims=True), 1e-12)
    return (att / norm).astype(np.float32)


def integer_array(value, key: str, source: str) -> np.ndarray:
    """``value`` as a flat int64 array, or a :class:`DataError` naming ``source`` and ``key``.

    Accepts integer arrays and float arrays of whole numbers (MATLAB stores indices as
    doubles); strings, booleans, fractions, NaN and infinities are errors, never truncated.
    """
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{source}: '{key}' is not an array of integers ({exc})") from exc
    arr = arr.reshape(-1)
    kind = arr.dtype.kind
    if kind in "iu":
        return arr.astype(np.int64)
    if kind == "f":
        bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{source}: '{key}' must hold whole numbers, but entry {i} is {arr[i].item()!r}"
                f"{f' ({bad.size} such entries)' if bad.size > 1 else ''}"
            )
        return arr.astype(np.int64)
    what = {"U": "strings", "S": "strings", "O": "objects (strings?)", "b": "booleans"}.get(kind, arr.dtype.name)
    example = f", e.g. {arr[0].item()!r}" if arr.size and kind != "O" else ""
    raise DataError(
        f"{source}: '{key}' must hold integers (0-based ids), got {what}{example}; map string labels to class ids first"
    )


@dataclasses.dataclass
class ZSLData:
    """A zero-shot dataset: features, labels, splits and class semantics.

    Args:
        name: dataset name (``demo``, ``cub``, ...).
        features: a :class:`FeatureSource` with ``shape == (N, R, F)``.
        labels: ``(N,)`` 0-based class ids.
        trainval_loc, test_seen_loc, test_unseen_loc: 0-based row indices.
        att: ``(C, K)`` class attributes as the model uses them (§1.4).
        w2v: ``(K, D)`` attribute word vectors.
        class_names: ``C`` class names.
        attribute_names: ``K`` attribute names.
        train_loc, val_loc: optional class-disjoint split of the seen classes.
        original_att: optional raw ``(C, K)`` class attributes.
        source: where the data came from (used in error messages).
    """

    name: str
    features: FeatureSource
    labels: np.ndarray
    trainval_loc: np.ndarray
    test_seen_loc: np.ndarray
    test_unseen_loc: np.ndarray
    att: np.ndarray
    w2v: np.ndarray
    class_names: Sequence[str]
    attribute_names: Sequence[str]
    train_loc: Optional[np.ndarray] = None
    val_loc: Optional[np.ndarray] = None
    original_att: Optional[np.ndarray] = None
    source: str = "<memory>"

    def __post_init__(self):
        self.labels = integer_array(self.labels, "labels", self.source)
        for key in ("trainval_loc", "test_seen_loc", "test_unseen_loc", "train_loc", "val_loc"):
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, integer_array(value, key, self.source))
        self.att = np.asarray(self.att, dtype=np.float32)
        self.w2v = np.asarray(self.w2v, dtype=np.float32)
        self.class_names = [str(n) for n in self.class_names]
        self.attribute_names = [str(n) for n in self.attribute_names]
        validate(self)

    # Derived quantities (docs/reference.md §1.2: not contiguous, derived from splits).
    @property
    def seen_classes(self) -> np.ndarray:
        return np.unique(self.labels[self.trainval_loc])

    @property
    def unseen_classes(self) -> np.ndarray:
        return np.unique(self.labels[self.test_unseen_loc])

    @property
    def num_classes(self) -> int:
        return int(self.att.shape[0])

    @property
    def num_attributes(self) -> int:
        return int(self.att.shape[1])

    @property
    def num_regions(self) -> int:
        return int(self.features.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[2])

    def summary(self) -> dict:
        """Sizes as a plain dict (for logs and ``results.json``)."""
        return {
            "name": self.name,
            "source": self.source,
            "images": int(self.labels.shape[0]),
            "regions": self.num_regions,
            "channels": self.feature_dim,
            "attributes": self.num_attributes,
            "classes": self.num_classes,
            "seen_classes": int(len(self.seen_classes)),
            "unseen_classes": int(len(self.unseen_classes)),
            "trainval": int(len(self.trainval_loc)),
            "test_seen": int(len(self.test_seen_loc)),
            "test_unseen": int(len(self.test_unseen_loc)),
        }


def validate(data: ZSLData) -> None:
    """Consistency checks; each failure names the source, the key and what was expected.

    Checks: shapes of ``att``/``w2v``/names agree, labels are in ``[0, C)``, every
    split index is in ``[0, N)``, seen and unseen classes are disjoint, no unseen
    class appears in trainval, test_seen only holds seen classes, and the
    optional ``train_loc``/``val_loc`` lie inside trainval.
    """
    _check_shapes(data)
    _check_not_empty(data)
    _check_finite(data)
    _check_labels_and_rows(data)
    _check_no_leakage(data)
    _check_split_classes(data)


def _check_not_empty(data: ZSLData) -> None:
    """Every dimension the model needs is at least 1: regions, channels, classes, attributes, word-vector length.

    With zero of any of them MSDN trains to chance and reports it, or crashes inside
    oneDNN (zero attributes); the error names the file and the dimension instead.
    """
    n, r, f = (int(v) for v in data.features.shape)
    where = feature_file(data.features, data.source)
    for size, what in ((r, "regions (H x W of the feature maps)"), (f, "feature channels")):
        if size == 0:
            raise DataError(f"{where}: the features have zero {what}, shape (N, R, F) = {(n, r, f)}; MSDN needs >= 1")
    c, k = data.att.shape
    if c == 0:
        raise DataError(f"{data.source}: 'att' has zero classes, shape {data.att.shape}")
    if k == 0:
        raise DataError(f"{data.source}: 'att' has zero attributes, shape {data.att.shape}; MSDN needs >= 1 attribute")
    if data.w2v.shape[1] == 0:
        raise DataError(
            f"{data.source}: 'w2v_att' has zero-length word vectors, shape {data.w2v.shape}; "
            "every attribute needs a vector of length >= 1"
        )


def _check_shapes(data: ZSLData) -> None:
    """Features (N, R, F), N labels, ``att`` (C, K), ``w2v`` (K, D), C class and K attribute names."""
    src = data.source
    n = int(data.features.shape[0])
    if len(data.features.shape) != 3:
        raise DataError(f"{src}: features must be (N, R, F), got shape {tuple(data.features.shape)}")
    if data.labels.shape[0] != n:
        raise DataError(f"{src}: 'labels' has {data.labels.shape[0]} entries but the feature file has {n} images")
    if data.att.ndim != 2:
        raise DataError(f"{src}: 'att' must be 2-D (classes, attributes), got shape {data.att.shape}")
    c, k = data.att.shape
    if data.w2v.ndim != 2 or data.w2v.shape[0] != k:
        raise DataError(
            f"{src}: 'w2v_att' must be ({k}, D) to match {k} attributes in 'att', got shape {data.w2v.shape}"
        )
    if len(data.class_names) != c:
        raise DataError(f"{src}: {len(data.class_names)} class names but 'att' has {c} classes")
    if len(data.attribute_names) != k:
        raise DataError(f"{src}: {len(data.attribute_names)} attribute names but 'att' has {k} attributes")


def _check_finite(data: ZSLData) -> None:
    """No NaN or infinite value in ``att`` or ``w2v``; the error names the classes/attributes."""
    bad = np.flatnonzero(~np.isfinite(data.att).all(axis=1))
    if bad.size:
        raise DataError(
            f"{data.source}: 'att' (class attributes) holds NaN or infinite values for class(es) "
            f"{[data.class_names[i] for i in bad[:10]]}"
        )
    bad = np.flatnonzero(~np.isfinite(data.w2v).all(axis=1))
    if bad.size:
        raise DataError(
            f"{data.source}: 'w2v_att' (attribute word vectors) holds NaN or infinite values for "
            f"attribute(s) {[data.attribute_names[i] for i in bad[:10]]}"
        )


def _check_labels_and_rows(data: ZSLData) -> None:
    """Labels in ``[0, C)``; every split non-empty (the main three), in ``[0, N)`` and without repeats."""
    src = data.source
    n = int(data.features.shape[0])
    c = data.att.shape[0]
    if n and (data.labels.min() < 0 or data.labels.max() >= c):
        raise DataError(
            f"{src}: 'labels' must be 0-based class ids in [0, {c}), found range "
            f"[{data.labels.min()}, {data.labels.max()}]"
        )
    for key in ("trainval_loc", "test_seen_loc", "test_unseen_loc", "train_loc", "val_loc"):
        loc = getattr(data, key)
        if loc is None:
            continue
        if key in ("trainval_loc", "test_seen_loc", "test_unseen_loc") and loc.size == 0:
            raise DataError(f"{src}: '{key}' is empty")
        if loc.size and (loc.min() < 0 or loc.max() >= n):
            raise DataError(
                f"{src}: '{key}' must hold 0-based row indices in [0, {n}), found range [{loc.min()}, {loc.max()}]"
            )
        unique, counts = np.unique(loc, return_counts=True)
        if unique.size != loc.size:
            dup = unique[counts > 1]
            raise DataError(
                f"{src}: '{key}' lists {loc.size - unique.size} row(s) more than once "
                f"(e.g. row {int(dup[0])} {int(counts[counts > 1][0])} times); each image "
                "belongs in a split once"
            )


def _check_no_leakage(data: ZSLData) -> None:
    """No row in two of trainval, test_seen and test_unseen: a test image seen in training is leakage."""
    splits = ("trainval_loc", "test_seen_loc", "test_unseen_loc")
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            both = np.intersect1d(getattr(data, a), getattr(data, b))
            if both.size:
                raise DataError(
                    f"{data.source}: {both.size} row(s) are in both '{a}' and '{b}' ({describe_rows(both)}); "
                    "an image used for training and testing makes the accuracy meaningless (leakage): "
                    "each image belongs in one split"
                )


def _check_split_classes(data: ZSLData) -> None:
    """Seen and unseen classes disjoint, test_seen only seen classes, train/val inside trainval."""
    src = data.source
    seen, unseen = data.seen_classes, data.unseen_classes
    both = np.intersect1d(seen, unseen)
    if both.size:
        raise DataError(
            f"{src}: seen and unseen classes must be disjoint, but classes {both[:10].tolist()} "
            "appear in both 'trainval_loc' and 'test_unseen_loc'"
        )
    stray = np.setdiff1d(np.unique(data.labels[data.test_seen_loc]), seen)
    if stray.size:
        raise DataError(f"{src}: 'test_seen_loc' holds classes {stray[:10].tolist()} that are not in trainval")
    if data.train_loc is not None and data.val_loc is not None:
        outside = np.setdiff1d(np.concatenate([data.train_loc, data.val_loc]), data.trainval_loc)
        if outside.size:
            raise DataError(f"{src}: 'train_loc'/'val_loc' hold {outside.size} rows outside 'trainval_loc'")
