"""A user's own attribute-annotated images as one more entry (``custom``) of the dataset table.

``python -m msdn_tf.custom prepare`` (:func:`prepare_dataset`) reads the user's
format, validates it, computes the splits and the attribute vectors, and
extracts ResNet-101 feature maps through :func:`msdn_tf.data.extraction.extract_features`
into a prepared folder ``DATA_DIR``:

* ``features.hdf5``: the docs/reference.md §1.1 layout (``feature_map``, ``labels``,
  ``trainval_loc``/``test_seen_loc``/``test_unseen_loc``, optional
  ``train_loc``/``val_loc``, ``att`` = ``original_att`` = the user's table (rows are
  L2-normalised when loaded, §1.4), ``w2v_att``, ``allclasses_names``,
  ``attribute_names``);
* ``custom.json``: the manifest (sources, class/attribute names, unseen classes,
  split sizes, backbone, word-vector report);
* ``images.csv``: ``path,class,split`` of every row of ``features.hdf5``.

The ``custom`` entry of :mod:`msdn_tf.data.registry` (:func:`load_custom_dataset`) loads
``config.data.data_dir`` back into a :class:`~msdn_tf.data.base.ZSLData`,
so training, evaluation, export and visualisation are the benchmark code paths.
The input format is documented in ``docs/custom_data.md``.
"""

from __future__ import annotations

import csv
import datetime
import difflib
import os
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from msdn_tf.data.base import ZSLData
from msdn_tf.data.cache import use_cache
from msdn_tf.errors import DataError, MSDNError
from msdn_tf.limits import MAX_TEXT_BYTES, check_text_file, load_json_file, load_yaml_file, read_text_file, short_repr

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
MANIFEST_FILE = "custom.json"
FEATURE_FILE = "features.hdf5"
IMAGES_FILE = "images.csv"
MANIFEST_FORMAT = "msdn_tf.custom/1"
SPLITS = ("trainval", "test_seen", "test_unseen")
_PATH_COLUMNS = ("path", "image", "file", "filename", "image_path", "image_file")
_CLASS_COLUMNS = ("class", "label", "class_name", "category")
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _short(items: Sequence, n: int = 10) -> str:
    items = list(items)
    return ", ".join(short_repr(x, 60) for x in items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------
# Images


@dataclass
class ImageEntry:
    """One image: its file, its class name, an optional given split, where it was listed."""

    path: str
    cls: str
    split: Optional[str] = None
    where: str = ""


def read_image_folder(root) -> List[ImageEntry]:
    """``root/<class>/**/*.{jpg,jpeg,png,bmp,gif}`` -> entries sorted by class then path.

    Hidden files and files with other extensions are skipped. Files directly in
    ``root`` (not in a class folder) raise.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (expected {root}/<class>/*.jpg)")
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise DataError(
            f"{root}: images must be in one folder per class ({root}/<class>/*.jpg); found images "
            f"directly in {root}: {_short(loose, 5)}"
        )
    out = []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in cls_dir.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        out.extend(ImageEntry(os.path.abspath(p), cls_dir.name, None, str(p)) for p in files)
    if not out:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders {root}/<class>/")
    return out


def read_image_csv(path, images_root=None) -> List[ImageEntry]:
    """A CSV of ``path,class[,split]`` (header optional) -> entries in file order.

    Args:
        path: the CSV. With a header, the columns are found by name (``path``/``image``/
            ``file``..., ``class``/``label``..., optional ``split``); without one they
            are taken in that order.
        images_root: folder relative paths are relative to (default: the CSV's folder).

    ``split`` values, when given for every row, must be ``trainval``, ``test_seen``
    or ``test_unseen``: they replace the random split (the unseen classes are then
    the classes of the ``test_unseen`` rows).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image CSV not found")
    root = Path(images_root) if images_root else path.parent
    check_text_file(path, "image CSV")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [(i, r) for i, r in enumerate(csv.reader(fh), 1) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the image CSV ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: the image CSV is empty")
    header = [c.strip().lower() for c in rows[0][1]]
    ip, ic, isplit = 0, 1, None
    if any(h in _PATH_COLUMNS for h in header):
        try:
            ip = next(i for i, h in enumerate(header) if h in _PATH_COLUMNS)
            ic = next(i for i, h in enumerate(header) if h in _CLASS_COLUMNS)
        except StopIteration:
            raise DataError(
                f"{path}: the header {short_repr(rows[0][1])} needs a path column ({'/'.join(_PATH_COLUMNS)}) "
                f"and a class column ({'/'.join(_CLASS_COLUMNS)})"
            ) from None
        isplit = header.index("split") if "split" in header else None
        rows = rows[1:]
    elif len(header) >= 3:
        isplit = 2
    out = []
    for lineno, r in rows:
        need = max(ip, ic, isplit or 0) + 1
        if len(r) < need:
            raise DataError(
                f"{path}: line {lineno} has {len(r)} column(s), expected path,class"
                + (",split" if isplit is not None else "")
            )
        file, cls = r[ip].strip(), r[ic].strip()
        if not file or not cls:
            raise DataError(f"{path}: line {lineno}: empty image path or class name")
        split = r[isplit].strip() if isplit is not None and r[isplit].strip() else None
        if split is not None and split not in SPLITS:
            raise DataError(f"{path}: line {lineno}: split {short_repr(split, 60)} must be one of {', '.join(SPLITS)}")
        full = file if os.path.isabs(file) else os.path.abspath(root / file)
        out.append(ImageEntry(full, cls, split, f"{path}:{lineno}"))
    if not out:
        raise DataError(f"{path}: the image CSV lists no images")
    given = [e.split is not None for e in out]
    if any(given) and not all(given):
        first = next(e for e in out if e.split is None)
        raise DataError(
            f"{path}: the split column must be filled for every row or for none; {first.where} ({first.path}) has none"
        )
    return out


def check_duplicate_images(entries: Sequence[ImageEntry]) -> None:
    """Each image file once: a file listed twice (or under two classes, or reached through a
    link) would land in two rows, possibly in training and test (leakage). Names the listings."""
    first, dups = {}, []
    for e in entries:
        key = os.path.realpath(e.path)
        if key in first:
            dups.append((first[key], e))
        else:
            first[key] = e
    if dups:
        shown = "; ".join(f"{b.path} at {a.where} ({a.cls}) and {b.where} ({b.cls})" for a, b in dups[:5])
        raise DataError(
            f"{len(dups)} image file(s) are listed more than once: {shown}; an image in two rows can be in "
            "training and in a test split (leakage): list each image once, under its one class"
        )


def check_image_files(entries: Sequence[ImageEntry]) -> None:
    """Every image exists, is non-empty and starts like a JPEG/PNG/GIF/BMP; else name them all."""
    missing, bad = [], []
    for e in entries:
        try:
            with open(e.path, "rb") as fh:
                head = fh.read(8)
        except OSError:
            missing.append(e)
            continue
        if not any(head.startswith(magic) for magic, _ in _MAGIC):
            bad.append(e)
    if missing:
        raise DataError(
            f"{len(missing)} image file(s) not found or unreadable: "
            + "; ".join(f"{e.path} (listed at {e.where})" for e in missing[:10])
        )
    if bad:
        raise DataError(
            f"{len(bad)} file(s) are not readable JPEG/PNG/GIF/BMP images (empty or another format): "
            + "; ".join(e.path for e in bad[:10])
        )


# ---------------------------------------------------------------------------------------------
# Class x attribute table


@dataclass
class AttributeTable:
    """The class x attribute table: names in file order and ``(C, K)`` float64 values."""

    class_names: List[str]
    attribute_names: List[str]
    values: np.ndarray
    path: str = ""


def read_attribute_table(path, warn: Callable[[str], None] = _stderr) -> AttributeTable:
    """Read the class x attribute CSV (``.tsv``: tab-separated).

    First row: a header (first cell anything, e.g. ``class``; then the attribute
    names). Each following row: a class name, then one number per attribute
    (continuous or 0/1). Class ids of the prepared data follow the row order.

    Raises:
        DataError: naming the file, row and class/attribute of duplicated names,
            short rows, values that are not numbers, NaN/empty or infinite values.
    Warns:
        for constant attribute columns and classes whose row is all zeros.
    """
    path = Path(path)
    rows = _read_table_rows(path)
    attributes = _attribute_header(path, rows[0][1])
    names, values, seen_at = [], [], {}
    for lineno, r in rows[1:]:
        cls = r[0].strip()
        if not cls:
            raise DataError(f"{path}: line {lineno}: empty class name")
        if cls in seen_at:
            raise DataError(
                f"{path}: line {lineno}: class {short_repr(cls, 60)} is listed twice (first at line {seen_at[cls]})"
            )
        seen_at[cls] = lineno
        names.append(cls)
        values.append(_class_row(path, lineno, cls, attributes, [c.strip() for c in r[1:]]))
    values = np.asarray(values, dtype=np.float64)
    _warn_uninformative(path, names, attributes, values, warn)
    return AttributeTable(names, attributes, values, str(path))


def _read_table_rows(path: Path) -> list:
    """``[(line number, cells)]`` of the non-blank rows (``.tsv``: tab-separated); a header and a class at least."""
    if not path.is_file():
        raise DataError(f"{path}: attribute table not found")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    check_text_file(path, "attribute table")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [
                (i, r) for i, r in enumerate(csv.reader(fh, delimiter=delimiter), 1) if r and any(c.strip() for c in r)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the attribute table ({exc})") from exc
    if len(rows) < 2:
        raise DataError(
            f"{path}: the attribute table needs a header row (class, attribute names...) and one row per class"
        )
    return rows


def _attribute_header(path: Path, header_cells) -> list:
    """The attribute names of the header row: present, non-empty and unique."""
    header = [c.strip() for c in header_cells]
    attributes = header[1:]
    if not attributes:
        raise DataError(
            f"{path}: the header has no attribute names (first column: class, then one column per attribute)"
        )
    if any(not a for a in attributes):
        raise DataError(f"{path}: header column {attributes.index('') + 2} has an empty attribute name")
    dup = [a for a, n in Counter(attributes).items() if n > 1]
    if dup:
        raise DataError(f"{path}: duplicated attribute names in the header: {_short(dup)}")
    return attributes


def _class_row(path: Path, lineno: int, cls: str, attributes, cells) -> list:
    """One class's values: one finite number per attribute, else an error naming line, class and attribute."""
    if len(cells) != len(attributes):
        raise DataError(
            f"{path}: line {lineno} (class {short_repr(cls, 60)}) has {len(cells)} values, the header names "
            f"{len(attributes)} attributes"
        )
    row = []
    for a, c in zip(attributes, cells):
        try:
            v = float(c) if c else float("nan")
        except ValueError:
            raise DataError(
                f"{path}: line {lineno}, class {short_repr(cls, 60)}, attribute {short_repr(a, 60)}: "
                f"{short_repr(c, 60)} is not a number"
            ) from None
        if not np.isfinite(v):
            raise DataError(
                f"{path}: line {lineno}, class {short_repr(cls, 60)}, attribute {short_repr(a, 60)}: value is "
                f"{'missing/NaN' if np.isnan(v) else 'infinite'}; every class needs a value for "
                "every attribute"
            )
        row.append(v)
    return row


def _warn_uninformative(path: Path, names, attributes, values: np.ndarray, warn: Callable[[str], None]) -> None:
    """Warn about attribute columns constant over all classes and classes whose row is all zeros."""
    constant = [a for j, a in enumerate(attributes) if np.all(values[:, j] == values[0, j])]
    if constant:
        warn(
            f"warning: {path}: {len(constant)} attribute column(s) are constant over all classes and carry no "
            f"information: {_short(constant)}"
        )
    zero = [c for c, row in zip(names, values) if not np.any(row)]
    if zero:
        warn(
            f"warning: {path}: class(es) {_short(zero)} have all-zero attributes; the model cannot tell them "
            "apart from anything"
        )


# ---------------------------------------------------------------------------------------------
# Unseen classes and attribute vectors


def read_unseen_list(path) -> List[str]:
    """Unseen class names from a ``.txt`` (one per line, ``#`` comments) or ``.yaml`` (a list or
    ``{unseen: [...]}``) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: unseen-class list not found")
    if path.suffix.lower() in (".yaml", ".yml"):
        content = load_yaml_file(path, "unseen-class list")
        if isinstance(content, dict):
            content = content.get("unseen")
        if not isinstance(content, list):
            raise DataError(f"{path}: expected a YAML list of class names (or a mapping with key 'unseen')")
        names = [str(x).strip() for x in content]
    else:
        text = read_text_file(path, MAX_TEXT_BYTES, "unseen-class list", DataError, "MAX_TEXT_BYTES")
        names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        names = [n for n in names if n]
    dup = [n for n, k in Counter(names).items() if k > 1]
    if dup:
        raise DataError(f"{path}: unseen classes listed twice: {_short(dup)}")
    return names


def choose_unseen(class_names: Sequence[str], fraction: float, seed: int) -> List[str]:
    """``round(fraction * C)`` classes drawn at random with ``seed`` (at least 1, at most C - 1)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--unseen-fraction must be in (0, 1), got {fraction}")
    c = len(class_names)
    n = int(round(fraction * c))
    if n < 1 or n > c - 1:
        raise DataError(
            f"--unseen-fraction {fraction} of {c} classes gives {n} unseen classes; need between 1 and {c - 1}"
        )
    pick = np.random.default_rng(seed).choice(c, size=n, replace=False)
    return [class_names[i] for i in sorted(pick)]


def _read_npy_vectors(path: Path) -> np.ndarray:
    """A numeric ``.npy`` array (pickles refused)."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a numeric .npy array ({exc})") from exc


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _read_csv_vectors(path: Path, attribute_names: Sequence[str]) -> np.ndarray:
    """Rows of a CSV of vectors: by attribute name (first cell) or in table order; a header row skipped."""
    check_text_file(path, "attribute-vector CSV")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [(i, [c.strip() for c in r]) for i, r in enumerate(csv.reader(fh), 1) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the attribute-vector CSV ({exc})") from exc
    if rows and not all(_is_number(c) for c in rows[0][1][1:]):
        rows = rows[1:]  # header
    named = bool(rows) and not _is_number(rows[0][1][0])
    by_name, plain = {}, []
    for lineno, r in rows:
        cells = r[1:] if named else r
        try:
            vec = [float(c) for c in cells]
        except ValueError:
            raise DataError(f"{path}: line {lineno} holds a value that is not a number") from None
        if named:
            by_name[r[0]] = vec
        else:
            plain.append(vec)
    if named:
        missing = [a for a in attribute_names if a not in by_name]
        if missing:
            raise DataError(f"{path}: no vector for attribute(s) {_short(missing)}")
        plain = [by_name[a] for a in attribute_names]
    if len({len(v) for v in plain}) > 1:
        raise DataError(f"{path}: rows have different lengths {sorted({len(v) for v in plain})}")
    return np.asarray(plain, dtype=np.float64)


def read_attribute_vectors_file(path, attribute_names: Sequence[str]) -> np.ndarray:
    """``(K, D)`` vectors given directly: ``.npy`` (no pickles) or CSV.

    CSV: one row per attribute; rows may start with the attribute name (then they
    are matched by name, any order) or hold only numbers (table order); a header
    row of non-numbers is skipped.
    """
    path = Path(path)
    k = len(attribute_names)
    if not path.is_file():
        raise DataError(f"{path}: attribute-vector file not found")
    arr = _read_npy_vectors(path) if path.suffix.lower() == ".npy" else _read_csv_vectors(path, attribute_names)
    if arr.ndim != 2 or arr.shape[0] != k:
        raise DataError(
            f"{path}: attribute vectors must be (K={k}, D), one row per attribute of the table; got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{path}: attribute vectors must be numbers, got {arr.dtype}")
    bad = [str(attribute_names[i]) for i in np.flatnonzero(~np.isfinite(arr).all(axis=1))]
    if bad:
        raise DataError(
            f"{path}: the vector(s) of attribute(s) {_short(bad)} hold NaN or infinite values; "
            "every attribute needs a finite vector"
        )
    return arr.astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Matching and splits


def match_classes(entries: Sequence[ImageEntry], table: AttributeTable, images_source: str) -> np.ndarray:
    """0-based labels (table row order) of the images; every class needs images and vice versa."""
    index = {c: i for i, c in enumerate(table.class_names)}
    unknown = OrderedDict()
    for e in entries:
        if e.cls not in index:
            unknown.setdefault(e.cls, e)
    if unknown:
        detail = "; ".join(
            f"{c!r} (e.g. {e.path}){_suggest(c, table.class_names)}" for c, e in list(unknown.items())[:10]
        )
        raise DataError(
            f"{images_source}: images of {len(unknown)} class(es) that are not in the attribute table "
            f"{table.path}: {detail}"
        )
    labels = np.asarray([index[e.cls] for e in entries], dtype=np.int64)
    empty = [c for i, c in enumerate(table.class_names) if not np.any(labels == i)]
    if empty:
        raise DataError(
            f"{table.path}: {len(empty)} class(es) of the attribute table have no images in "
            f"{images_source}: {_short(empty)}"
        )
    return labels


def resolve_unseen(table: AttributeTable, unseen: Sequence[str], source: str) -> np.ndarray:
    """Class ids of the unseen class names; each must be in the table, some but not all classes."""
    index = {c: i for i, c in enumerate(table.class_names)}
    unknown = [u for u in unseen if u not in index]
    if unknown:
        raise DataError(
            f"{source}: unseen class(es) not in the attribute table {table.path}: "
            + "; ".join(f"{u!r}{_suggest(u, table.class_names)}" for u in unknown[:10])
        )
    ids = np.asarray(sorted(index[u] for u in unseen), dtype=np.int64)
    if ids.size == 0:
        raise DataError(f"{source}: no unseen classes; zero-shot learning needs at least one class held out")
    if ids.size == len(table.class_names):
        raise DataError(f"{source}: all {ids.size} classes are unseen; at least one class must be seen in training")
    return ids


def split_rows(
    labels: np.ndarray,
    unseen_ids: np.ndarray,
    class_names: Sequence[str],
    *,
    test_seen_fraction: float = 0.2,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> Dict[str, np.ndarray]:
    """Seeded splits: per seen class ``test_seen_fraction`` of its images to test_seen (at least one,
    at least one left for trainval), all unseen images to test_unseen; optionally a class-disjoint
    ``train_loc``/``val_loc`` of trainval holding ``val_fraction`` of the seen classes."""
    if not 0.0 < test_seen_fraction < 1.0:
        raise DataError(f"--test-seen-fraction must be in (0, 1), got {test_seen_fraction}")
    rng = np.random.default_rng(seed)
    unseen = set(int(u) for u in unseen_ids)
    seen = [c for c in np.unique(labels) if int(c) not in unseen]
    trainval, test_seen = [], []
    for c in seen:
        rows = np.flatnonzero(labels == c)
        if rows.size < 2:
            raise DataError(
                f"seen class {class_names[c]!r} has {rows.size} image; a seen class needs at least 2 "
                "(one for trainval, one for test_seen)"
            )
        rows = rng.permutation(rows)
        n_test = int(min(max(round(test_seen_fraction * rows.size), 1), rows.size - 1))
        test_seen.extend(rows[:n_test].tolist())
        trainval.extend(rows[n_test:].tolist())
    out = {
        "trainval_loc": np.sort(np.asarray(trainval, np.int64)),
        "test_seen_loc": np.sort(np.asarray(test_seen, np.int64)),
        "test_unseen_loc": np.flatnonzero(np.isin(labels, list(unseen))).astype(np.int64),
    }
    out.update(class_disjoint_val(labels, out["trainval_loc"], val_fraction, seed))
    return out


def class_disjoint_val(labels, trainval_loc, val_fraction: float, seed: int) -> dict:
    """``train_loc``/``val_loc``: trainval rows of a random ``val_fraction`` of the seen classes go to val."""
    if not val_fraction:
        return {}
    seen = np.unique(labels[trainval_loc])
    n_val = int(round(val_fraction * seen.size))
    if not 0.0 < val_fraction < 1.0 or n_val < 1 or n_val > seen.size - 1:
        raise DataError(
            f"--val-fraction {val_fraction} of {seen.size} seen classes gives {n_val} validation "
            "classes; need between 1 and (seen classes - 1)"
        )
    val_classes = np.random.default_rng(seed + 1).choice(seen, size=n_val, replace=False)
    in_val = np.isin(labels[trainval_loc], val_classes)
    return {"train_loc": trainval_loc[~in_val], "val_loc": trainval_loc[in_val]}


def given_splits(
    entries: Sequence[ImageEntry],
    labels: np.ndarray,
    table: AttributeTable,
    source: str,
    unseen: Optional[Sequence[str]] = None,
) -> tuple:
    """Splits from the CSV's ``split`` column: ``(splits, unseen_ids)``; unseen classes must have
    no trainval/test_seen images."""
    split = np.asarray([e.split for e in entries])
    unseen_ids = np.unique(labels[split == "test_unseen"])
    for c in unseen_ids:
        clash = [e for e, lab in zip(entries, labels) if lab == c and e.split != "test_unseen"]
        if clash:
            raise DataError(
                f"{clash[0].where}: class {table.class_names[c]!r} has test_unseen images, so it is "
                f"unseen, but this row puts its image {clash[0].path} in {clash[0].split}; an unseen "
                "class must have no training images"
            )
    if unseen is not None:
        want = resolve_unseen(table, unseen, source)
        if set(want.tolist()) != set(unseen_ids.tolist()):
            raise DataError(
                f"{source}: the unseen list ({_short([table.class_names[i] for i in want])}) differs "
                f"from the classes of the split column's test_unseen rows "
                f"({_short([table.class_names[i] for i in unseen_ids])})"
            )
    resolve_unseen(table, [table.class_names[i] for i in unseen_ids], source)
    stray = np.setdiff1d(np.unique(labels[split == "test_seen"]), np.unique(labels[split == "trainval"]))
    if stray.size:
        raise DataError(
            f"{source}: class(es) {_short([table.class_names[i] for i in stray])} have test_seen images "
            "but no trainval images"
        )
    return (
        {
            key: np.flatnonzero(split == name).astype(np.int64)
            for key, name in (
                ("trainval_loc", "trainval"),
                ("test_seen_loc", "test_seen"),
                ("test_unseen_loc", "test_unseen"),
            )
        },
        unseen_ids,
    )


# ---------------------------------------------------------------------------------------------
# Backbone


def backbone_id(weights: str, seed: int) -> str:
    spec = "none" if weights in (None, "none", "None") else str(weights)
    return f"keras.applications.ResNet101(include_top=False, weights={spec})" + (
        f", initialised with keras.utils.set_random_seed({seed})" if spec == "none" else ""
    )


def build_backbone(weights: str = "imagenet", image_size: int = 448, seed: int = 0):
    """:func:`msdn_tf.backbones.keras_resnet.build_backbone`; with ``weights="none"`` the random weights are
    made reproducible by seeding first (same weights in every process for the same seed)."""
    from msdn_tf.backbones.keras_resnet import build_backbone as build

    if weights in (None, "none", "None"):
        import keras

        keras.utils.set_random_seed(int(seed))
    return build(weights, image_size)


def backbone_for_data_dir(data_dir, log: Callable[[str], None] = _stderr):
    """Rebuild the backbone a prepared folder was extracted with (for ``serving_images`` and
    attention on image files) and check it reproduces the stored features of one image.

    Returns:
        ``(backbone, image_size, backbone_id)`` or ``(None, None, reason)`` when it cannot
        be rebuilt here (an injected backbone, ImageNet weights without network, a mismatch).
    """
    manifest = read_manifest(data_dir)
    info = manifest.get("backbone", {})
    if info.get("weights") is None:
        return None, None, "the features were made by an injected backbone"
    size = int(info["image_size"])
    try:
        backbone = build_backbone(info["weights"], size, int(info.get("seed", 0)))
    except MSDNError as exc:
        return None, None, f"cannot rebuild the backbone ({exc})"
    probe = manifest.get("probe")
    if probe and os.path.isfile(probe["path"]):
        import keras

        from msdn_tf.backbones.keras_resnet import load_image

        x = keras.applications.resnet.preprocess_input(load_image(probe["path"], size)[None])
        got = np.asarray(keras.ops.convert_to_numpy(backbone(x, training=False)))[0]  # (h, w, F)
        from msdn_tf.data.hdf5 import HDF5Features

        want = HDF5Features(str(Path(data_dir) / manifest["feature_file"])).read([probe["row"]])[0]  # (R, F)
        err = float(np.max(np.abs(got.reshape(want.shape) - want)) / (np.max(np.abs(want)) + 1e-12))
        if err > 1e-3:
            return None, None, f"the rebuilt backbone does not reproduce the stored features (relative error {err:.2g})"
    return backbone, size, info.get("id")


# ---------------------------------------------------------------------------------------------
# Prepare


def read_manifest(data_dir) -> dict:
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: not found; {data_dir} is not a prepared custom dataset (make one with "
            "python -m msdn_tf.custom prepare ... --out DIR)"
        )
    manifest = load_json_file(path, "manifest")
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path}: not a custom.json written by prepare ({problem}); prepare the folder again")
    return manifest


def _manifest_problem(manifest) -> Optional[str]:
    """What is wrong with the shape of a parsed ``custom.json`` (None: the keys the readers use are well-formed)."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    feature_file = manifest.get("feature_file", FEATURE_FILE)
    if not isinstance(feature_file, str) or not feature_file or Path(feature_file).name != feature_file:
        return f"'feature_file' must be a file name in the folder, got {str(feature_file)[:60]!r}"
    for key in ("class_names", "attribute_names", "unseen_classes"):
        value = manifest.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"'{key}' must be a list of names"
    for key in ("backbone", "sizes", "attribute_vectors"):
        if key in manifest and not isinstance(manifest[key], dict):
            return f"'{key}' must be an object"
    probe = manifest.get("probe")
    if probe is not None and not (
        isinstance(probe, dict)
        and isinstance(probe.get("path"), str)
        and isinstance(probe.get("row"), int)
        and not isinstance(probe.get("row"), bool)
    ):
        return "'probe' must be an object with a 'path' (string) and a 'row' (integer)"
    backbone = manifest.get("backbone", {})
    if backbone.get("weights") is not None:
        size = backbone.get("image_size")
        if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 4096:
            return f"'backbone.image_size' must be an integer in [32, 4096], got {str(size)[:20]!r}"
        if not isinstance(backbone.get("weights"), str) or not isinstance(backbone.get("seed", 0), int):
            return "'backbone.weights' must be a string and 'backbone.seed' an integer"
    return None


def prepare_dataset(
    out,
    *,
    attributes,
    images=None,
    csv_file=None,
    images_root=None,
    unseen=None,
    unseen_fraction=None,
    seed: int = 0,
    attribute_vectors=None,
    word_vectors=None,
    allow_missing_words: bool = False,
    allow_zero_vectors: bool = False,
    test_seen_fraction: float = 0.2,
    val_fraction: float = 0.0,
    weights: str = "imagenet",
    image_size: int = 448,
    batch_size: int = 16,
    backbone=None,
    compression: Optional[str] = "gzip",
    overwrite: bool = False,
    restart: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = _stderr,
) -> dict:
    """Validate a user's dataset, write the metadata and extract the features into ``out``.

    Args:
        out: the prepared folder (``DATA_DIR``) to write.
        attributes: the class x attribute CSV.
        images / csv_file: a folder of class folders, or a CSV of ``path,class[,split]``.
        images_root: folder the CSV's relative paths are relative to (default: the CSV's folder).
        unseen / unseen_fraction: a list file of unseen class names, or a fraction held out with ``seed``.
        seed: seed of the unseen draw, the splits and (``weights="none"``) the backbone.
        attribute_vectors / word_vectors: ``(K, D)`` vectors given directly (.npy/.csv), or a
            word-vector text file (word2vec text / GloVe, optionally .gz) for the §1.3 recipe.
        allow_missing_words, allow_zero_vectors: see :func:`msdn_tf.data.wordvectors.attribute_vectors`.
        test_seen_fraction: share of each seen class's images held out as test_seen.
        val_fraction: share of the seen classes in a class-disjoint validation split (0: none).
        weights, image_size, batch_size, compression: feature extraction (:mod:`msdn_tf.data.extraction`).
        backbone: an injected backbone (tests); ``weights`` is then only recorded.
        overwrite: replace an existing prepared folder's feature file. restart: discard a partial one.

    Returns:
        The manifest written to ``out/custom.json``.

    Raises:
        DataError: anything wrong with the inputs, naming the file and the class/attribute/row.
    """
    from msdn_tf.data.extraction import extract_features
    from msdn_tf.utils import write_json

    _check_inputs_given(images, csv_file, attribute_vectors, word_vectors, unseen, unseen_fraction)
    out = Path(out)
    table = read_attribute_table(attributes, warn=log)
    source = str(images if images is not None else csv_file)
    entries = read_image_folder(images) if images is not None else read_image_csv(csv_file, images_root)
    labels = match_classes(entries, table, source)
    check_image_files(entries)
    splits, unseen_ids = _choose_splits(
        entries, labels, table, source, unseen, unseen_fraction, test_seen_fraction, val_fraction, seed
    )
    check_duplicate_images(entries)
    w2v, wv_report = _class_vectors(
        table, attribute_vectors, word_vectors, allow_missing_words, allow_zero_vectors, log
    )
    metadata = {
        "labels": labels,
        **splits,
        "att": table.values,
        "original_att": table.values,
        "w2v_att": w2v,
        "allclasses_names": table.class_names,
        "attribute_names": table.attribute_names,
    }
    _check_as_loader_will(labels, splits, table, w2v, source)
    feature_path = out / FEATURE_FILE
    if feature_path.exists() and not overwrite:  # refused before anything in out is written
        raise DataError(f"{feature_path} already exists; remove it or pass --overwrite (nothing was written)")

    out.mkdir(parents=True, exist_ok=True)
    unseen_names = [table.class_names[i] for i in unseen_ids]
    log(
        f"msdn-tf custom: {len(entries)} images, {len(table.class_names)} classes ({len(unseen_names)} unseen: "
        f"{_short(unseen_names, 6)}), {len(table.attribute_names)} attributes, vectors {w2v.shape}; splits "
        f"trainval {splits['trainval_loc'].size} / test_seen {splits['test_seen_loc'].size} / test_unseen "
        f"{splits['test_unseen_loc'].size}"
    )

    weights_spec = None if backbone is not None else _weights_spec(weights)
    bid = "injected backbone" if backbone is not None else backbone_id(weights_spec, seed)
    if backbone is None:
        backbone = build_backbone(weights_spec, image_size, seed)
    extract_features(
        [e.path for e in entries],
        str(feature_path),
        backbone,
        batch_size=batch_size,
        image_size=image_size,
        compression=compression,
        metadata=metadata,
        backbone_id=bid,
        overwrite=overwrite,
        restart=restart,
        progress=progress,
        log=log,
    )
    sources = {
        "images": str(images) if images is not None else None,
        "csv": str(csv_file) if csv_file is not None else None,
        "attributes": str(attributes),
        "unseen": str(unseen) if unseen is not None else None,
        "unseen_fraction": unseen_fraction,
        "seed": int(seed),
        "test_seen_fraction": test_seen_fraction,
        "val_fraction": val_fraction,
    }
    backbone_info = {"weights": weights_spec, "seed": int(seed), "image_size": int(image_size), "id": bid}
    manifest = _manifest(table, entries, splits, unseen_names, w2v, wv_report, sources, backbone_info)
    _write_images_file(out / IMAGES_FILE, entries, splits)  # after the features: a refused prepare changes nothing
    write_json(out / MANIFEST_FILE, manifest)
    log(f"msdn-tf custom: wrote {feature_path}, {out / MANIFEST_FILE}, {out / IMAGES_FILE}")
    return manifest


def _check_inputs_given(images, csv_file, attribute_vectors, word_vectors, unseen, unseen_fraction) -> None:
    """Exactly one image source, one vector source and at most one way of naming the unseen classes."""
    if (images is None) == (csv_file is None):
        raise DataError("give exactly one of --images DIR (class folders) or --csv FILE (path,class[,split])")
    if (attribute_vectors is None) == (word_vectors is None):
        raise DataError(
            "give exactly one of --attribute-vectors FILE (.npy/.csv, K x D) or --word-vectors FILE "
            "(word2vec text / GloVe, optionally .gz)"
        )
    if unseen is not None and unseen_fraction is not None:
        raise DataError("give only one of --unseen FILE and --unseen-fraction F")


def _choose_splits(
    entries,
    labels,
    table,
    source: str,
    unseen,
    unseen_fraction,
    test_seen_fraction: float,
    val_fraction: float,
    seed: int,
):
    """``(splits, unseen_ids)``: from the CSV's split column, or drawn from the unseen classes given."""
    if entries[0].split is not None:
        splits, unseen_ids = given_splits(
            entries, labels, table, source, read_unseen_list(unseen) if unseen is not None else None
        )
        if unseen_fraction is not None:
            raise DataError(f"{source}: the split column fixes the unseen classes; drop --unseen-fraction")
        splits.update(class_disjoint_val(labels, splits["trainval_loc"], val_fraction, seed))
        return splits, unseen_ids
    if unseen is not None:
        unseen_ids = resolve_unseen(table, read_unseen_list(unseen), str(unseen))
    elif unseen_fraction is not None:
        unseen_ids = resolve_unseen(table, choose_unseen(table.class_names, unseen_fraction, seed), "--unseen-fraction")
    else:
        raise DataError("give the unseen classes: --unseen FILE or --unseen-fraction F (or a split column in --csv)")
    splits = split_rows(
        labels,
        unseen_ids,
        table.class_names,
        test_seen_fraction=test_seen_fraction,
        val_fraction=val_fraction,
        seed=seed,
    )
    return splits, unseen_ids


def _class_vectors(
    table,
    attribute_vectors,
    word_vectors,
    allow_missing_words: bool,
    allow_zero_vectors: bool,
    log: Callable[[str], None],
):
    """``(w2v (K, D), report)``: the attribute vectors given directly, or the §1.3 recipe on word vectors."""
    if attribute_vectors is not None:
        w2v = read_attribute_vectors_file(attribute_vectors, table.attribute_names)
        return w2v, {"file": str(attribute_vectors), "given": True, "dim": int(w2v.shape[1])}
    from msdn_tf.data.wordvectors import attribute_vectors as from_words

    return from_words(
        table.attribute_names,
        word_vectors,
        allow_missing_words=allow_missing_words,
        allow_zero_vectors=allow_zero_vectors,
        warn=log,
    )


def _check_as_loader_will(labels, splits: dict, table, w2v, source: str) -> None:
    """The checks the loader will make (a :class:`ZSLData` of placeholder features), before the long extraction."""
    from msdn_tf.data.base import ArrayFeatures, class_attributes_for_model

    ZSLData(
        name="custom",
        features=ArrayFeatures(np.zeros((len(labels), 1, 1), np.float32)),
        labels=labels,
        trainval_loc=splits["trainval_loc"],
        test_seen_loc=splits["test_seen_loc"],
        test_unseen_loc=splits["test_unseen_loc"],
        att=class_attributes_for_model(table.values),
        w2v=w2v,
        class_names=table.class_names,
        attribute_names=table.attribute_names,
        train_loc=splits.get("train_loc"),
        val_loc=splits.get("val_loc"),
        source=source,
    )


def _write_images_file(path: Path, entries, splits: dict) -> None:
    """``path,class,split`` for every image, in feature-row order (written atomically)."""
    from msdn_tf.utils import atomic_write_text

    split_of = np.full(len(entries), "", dtype=object)
    for key, name in (("trainval_loc", "trainval"), ("test_seen_loc", "test_seen"), ("test_unseen_loc", "test_unseen")):
        split_of[splits[key]] = name
    lines = ["path,class,split"] + [
        ",".join(_csv_cell(v) for v in (e.path, e.cls, split_of[i])) for i, e in enumerate(entries)
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _weights_spec(weights) -> str:
    """What the manifest records for ``--weights``: ``"none"``, ``"imagenet"`` or an absolute file path."""
    if weights in (None, "none", "None"):
        return "none"
    return weights if weights == "imagenet" else os.path.abspath(weights)


def _manifest(
    table, entries, splits: dict, unseen_names, w2v, wv_report: dict, sources: dict, backbone_info: dict
) -> dict:
    """The ``custom.json`` of a prepared folder: sources, names, sizes, vectors, backbone and a probe image."""
    probe_row = int(splits["test_unseen_loc"][0])
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "feature_file": FEATURE_FILE,
        "images_file": IMAGES_FILE,
        "sources": sources,
        "class_names": table.class_names,
        "attribute_names": table.attribute_names,
        "unseen_classes": unseen_names,
        "sizes": {
            "images": len(entries),
            "classes": len(table.class_names),
            "attributes": len(table.attribute_names),
            "vector_dim": int(w2v.shape[1]),
            **{k: int(v.size) for k, v in splits.items()},
        },
        "attribute_vectors": wv_report,
        "backbone": backbone_info,
        "probe": {"row": probe_row, "path": entries[probe_row].path, "class": entries[probe_row].cls},
    }


def _csv_cell(value) -> str:
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(ch in text for ch in ',"\n') else text


# ---------------------------------------------------------------------------------------------
# The dataset-table entry


def load_custom_dataset(data_dir, config=None) -> ZSLData:
    """Load a folder made by :func:`prepare_dataset` (features stay on disk)."""
    from msdn_tf.data.hdf5 import load_feature_map_hdf5

    if not data_dir:
        raise DataError(
            "--dataset custom needs --data-dir DIR, a folder made by python -m msdn_tf.custom "
            "prepare ... --out DIR (see docs/custom_data.md)"
        )
    from msdn_tf.data.base import check_data_dir

    folder = check_data_dir(data_dir)
    if not folder.is_dir():
        raise DataError(
            f"data directory {folder} does not exist; make it with python -m msdn_tf.custom prepare ... --out {folder}"
        )
    manifest = read_manifest(folder)
    path = folder / manifest.get("feature_file", FEATURE_FILE)
    if not path.is_file():
        partial = Path(str(path) + ".partial")
        hint = (
            f" (an unfinished extraction {partial} exists: re-run the same prepare command to resume it)"
            if partial.exists()
            else ""
        )
        raise DataError(f"{path}: not found{hint}")
    data = load_feature_map_hdf5(str(path), name="custom")
    if list(data.class_names) != list(manifest.get("class_names", data.class_names)):
        raise DataError(f"{path}: the class names differ from {folder / MANIFEST_FILE}; prepare the folder again")
    return use_cache(data, path, config) if config is not None else data
