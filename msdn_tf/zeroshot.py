"""Zero-shot after deployment: a trained MSDN re-targeted to another class set, without retraining.

MSDN scores an image against a class through the class's attribute row only:
``logits = att @ scores + bias * mask_bias`` (docs/reference.md §3). Nothing the model
learned depends on which rows ``att`` holds, so a class described next year by its
attributes is scored exactly as the classes of training day were, provided its row
goes through the same normalisation (§1.4: negative entries clipped for AWA2, then
every row scaled to unit L2 norm).

What a run records for that (``RUN/class_semantics.json``, written by
``python -m msdn_tf.train`` with every checkpoint, beside ``config.yaml``; derived from the config and the dataset
for older runs): the normalisation rule, the attribute names in column order, the class
names and their seen/unseen side.

Pieces:

* :func:`run_class_semantics`: the record of a run directory.
* :func:`read_class_file`: a ``class,<attribute names...>`` CSV of new class rows, in
  the form of the training data's class table; every problem is ONE line naming the
  file, the row and the column (:class:`~msdn_tf.errors.DataError`).
* :func:`class_set_with` / :func:`trained_class_set`: the class set the model will
  serve (trained classes plus the file's, or the file's only), each class marked
  ``trained-seen``, ``trained-unseen`` or ``added``. New classes take the unseen side
  of the margin and of calibrated stacking unless told otherwise.
* :func:`retarget_model`: the same trained model (same weights) over that class set.
* :func:`retarget_run`: all of it for a run directory (what ``msdn_tf.export
  --classes`` and ``msdn_tf.evaluate --classes`` call).

Example::

    from msdn_tf.evaluation.runs import load_run
    from msdn_tf import zeroshot

    config, model = load_run("runs/demo")
    semantics = zeroshot.run_class_semantics("runs/demo", config)
    table = zeroshot.read_class_file("new_birds.csv", semantics)
    classes = zeroshot.class_set_with(model, semantics, table)
    new_model = zeroshot.retarget_model(model, classes)   # C + len(table) classes

Reference: Chen et al., MSDN, CVPR 2022, §3 (class semantic vectors), Eq. 11
(calibrated stacking); docs/reference.md §1.4, §2, §7.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from msdn_tf.errors import DataError, MSDNError

SEMANTICS_FILE = "class_semantics.json"
SEMANTICS_FORMAT = "msdn_tf.class_semantics/1"
#: The normalisation of docs/reference.md §1.4, by name (the only one the reference uses).
RULE_L2_ROWS = "l2_rows"
NORM_EPS = 1e-12
TRAINED_SEEN, TRAINED_UNSEEN, ADDED = "trained-seen", "trained-unseen", "added"
SIDES = ("unseen", "seen")
#: Largest class file read (checked before reading): 64 MiB is ~200,000 classes of CUB's 312 attributes.
MAX_CLASS_FILE_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------------------------
# The run's record


def normalisation_rule(nonnegative: bool) -> dict:
    """The §1.4 rule as recorded: ``{"rule": "l2_rows", "nonnegative": bool, "eps": 1e-12}``."""
    return {
        "rule": RULE_L2_ROWS,
        "nonnegative": bool(nonnegative),
        "eps": NORM_EPS,
        "description": ("negative entries set to 0, then " if nonnegative else "")
        + "every class row divided by its L2 norm (at least 1e-12), in float64, stored as float32",
    }


def normalise_rows(raw, rule: dict) -> np.ndarray:
    """Raw class rows ``(C, K)`` -> model-ready rows, exactly as the run's training data (§1.4).

    The same function as the data readers (:func:`msdn_tf.data.base.class_attributes_for_model`).
    """
    from msdn_tf.data.base import class_attributes_for_model

    if rule.get("rule", RULE_L2_ROWS) != RULE_L2_ROWS:
        raise MSDNError(f"unknown class normalisation rule {rule.get('rule')!r} (this msdn-tf knows {RULE_L2_ROWS!r})")
    return class_attributes_for_model(np.asarray(raw, np.float64), nonnegative=bool(rule.get("nonnegative")))


def semantics_record(data, nonnegative: bool, dataset: str = "") -> dict:
    """The ``class_semantics.json`` content for a :class:`~msdn_tf.data.base.ZSLData`."""
    seen = set(int(c) for c in data.seen_classes)
    return {
        "format": SEMANTICS_FORMAT,
        "dataset": dataset or data.name,
        "normalisation": normalisation_rule(nonnegative),
        "num_attributes": int(data.num_attributes),
        "attribute_names": [str(a) for a in data.attribute_names],
        "class_names": [str(c) for c in data.class_names],
        "seen_classes": sorted(seen),
        "unseen_classes": [int(c) for c in data.unseen_classes],
        "trained_with": "rows of att = normalise(raw class table); raw values of any positive scale give the same rows",
    }


def write_class_semantics(out_dir, data, config) -> Path:
    """Write ``out_dir/class_semantics.json`` for the run's data (called with every checkpoint of a training run)."""
    from msdn_tf.utils import write_json

    path = Path(out_dir) / SEMANTICS_FILE
    write_json(path, semantics_record(data, _nonnegative_for(config), config.data.dataset))
    return path


def _nonnegative_for(config) -> bool:
    from msdn_tf.data.registry import get_spec

    try:
        return bool(get_spec(config.data.dataset).nonnegative_att)
    except MSDNError:
        return False


def run_class_semantics(run_dir, config=None, model=None) -> dict:
    """The class semantics of a run: ``RUN/class_semantics.json``, else derived.

    A run trained before the record existed (or converted from a PyTorch checkpoint)
    gets its rule from the dataset table (``config.data.dataset``), its attribute and
    class names from ``RUN/metadata.json`` or the dataset's files when they load, and
    its sides from the model. ``attribute_names`` is ``None`` when nothing names them;
    then a class file's header is checked for its length only.
    """
    run_dir = Path(run_dir)
    path = run_dir / SEMANTICS_FILE
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MSDNError(f"{path}: not valid JSON ({exc})") from exc
        if record.get("format") != SEMANTICS_FORMAT:
            raise MSDNError(f"{path}: format {record.get('format')!r}, expected {SEMANTICS_FORMAT!r}")
        record["source"] = str(path)
        return record
    if config is None:
        from msdn_tf.evaluation.runs import load_run_config

        config = load_run_config(run_dir)
    names = attributes = None
    meta_path = run_dir / "metadata.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MSDNError(f"{meta_path}: not valid JSON ({exc})") from exc
        names, attributes = meta.get("class_names"), meta.get("attribute_names")
    else:  # a training run from before the record: its dataset names its classes and attributes
        try:
            from msdn_tf.data.registry import load_dataset

            data = load_dataset(config)
            names = names or list(data.class_names)
            attributes = attributes or list(data.attribute_names)
        except MSDNError:
            pass
    if model is not None and attributes is not None and len(attributes) != int(model.num_attributes):
        attributes = None  # names of another attribute set: not this model's
    if model is not None and names is not None and len(names) != int(model.num_classes):
        names = None
    record = {
        "format": SEMANTICS_FORMAT,
        "dataset": config.data.dataset,
        "normalisation": normalisation_rule(_nonnegative_for(config)),
        "num_attributes": int(model.num_attributes) if model is not None else (len(attributes) if attributes else None),
        "attribute_names": [str(a) for a in attributes] if attributes else None,
        "class_names": [str(c) for c in names] if names else None,
        "seen_classes": sorted(int(c) for c in model.seen_classes) if model is not None else None,
        "unseen_classes": sorted(int(c) for c in model.unseen_classes) if model is not None else None,
        "source": f"derived from {run_dir / 'config.yaml'} (no {SEMANTICS_FILE} in the run)",
    }
    return record


# ---------------------------------------------------------------------------------------------
# The class file


@dataclasses.dataclass
class ClassTable:
    """Rows of a class file: names in file order, raw ``(n, K)`` float64 values, the file's SHA-256.

    ``rows`` are the 1-based row numbers in the file (the header is row 1).
    """

    names: List[str]
    values: np.ndarray
    path: str
    sha256: str
    rows: List[int]


def _where(path, row, col=None, header=None) -> str:
    if col is None:
        return f"{path}: row {row}"
    name = f" ({header[col - 1]!r})" if header is not None and 0 < col <= len(header) else ""
    return f"{path}: row {row}, column {col}{name}"


def read_class_file(
    path, semantics: dict, *, existing_names: Sequence[str] = (), max_bytes: int = MAX_CLASS_FILE_BYTES
) -> ClassTable:
    """Read a ``class,<attribute names...>`` CSV of class rows (``.tsv``: tab-separated).

    The form is the training data's class table: first column ``class``, then one
    column per attribute in the run's order, one row per class with the values a user
    would have put in that table (any positive scale: rows are normalised later).

    Args:
        path: the CSV file.
        semantics: :func:`run_class_semantics` (attribute names or count, rule).
        existing_names: class names that a row may not reuse (the trained classes when
            adding to them).
        max_bytes: refuse larger files before reading them.

    Raises:
        DataError: ONE line naming the file, the row and the column: a missing, empty,
            too large or non-UTF-8 file; a header that is not ``class`` plus the run's
            attribute names (or count); a short or long row; an empty or repeated class
            name; a name in ``existing_names``; a value that is not a finite number; a
            row that is all zero after the normalisation's clipping.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: row 1: cannot read the class file ({exc.strerror or exc})") from exc
    if path.is_dir():
        raise DataError(f"{path}: row 1: is a folder; pass a CSV file of class rows")
    if size > max_bytes:
        raise DataError(f"{path}: row 1: {size} bytes, more than the {max_bytes} bytes a class file may hold")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        row = raw[: exc.start].count(b"\n") + 1
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        delimiter = b"\t" if path.suffix.lower() == ".tsv" else b","
        col = raw[line_start : exc.start].count(delimiter) + 1
        raise DataError(
            f"{path}: row {row}, column {col}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None
    sha = hashlib.sha256(raw).hexdigest()
    if not text.strip():
        raise DataError(
            f"{path}: row 1: the file is empty; expected a header 'class,<attribute names>' and one row per class"
        )
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        rows = [(i, r) for i, r in _numbered_rows(text, delimiter) if r and any(c.strip() for c in r)]
    except csv.Error as exc:
        raise DataError(f"{path}: {exc}") from None
    header_row, header = rows[0]
    header = [c.strip() for c in header]
    _check_header(path, header_row, header, semantics)
    k = len(header) - 1
    if len(rows) < 2:
        raise DataError(f"{path}: row {header_row + 1}: no class rows after the header")
    existing = {str(n): i for i, n in enumerate(existing_names)}
    nonnegative = bool(semantics.get("normalisation", {}).get("nonnegative"))
    names, values, numbers, first = [], [], [], {}
    for lineno, cells in rows[1:]:
        cells = [c.strip() for c in cells]
        if len(cells) != k + 1:
            col = len(cells) + 1 if len(cells) < k + 1 else k + 2  # the first missing or extra cell
            what = "missing" if len(cells) < k + 1 else "extra"
            raise DataError(
                f"{_where(path, lineno, col, header)}: {what} cell: this row has {len(cells)} cells, the header "
                f"{k + 1} (class + {k} attributes)"
            )
        name = cells[0]
        if not name:
            raise DataError(f"{_where(path, lineno, 1, header)}: empty class name")
        if name in first:
            raise DataError(
                f"{_where(path, lineno, 1, header)}: class {name!r} is listed twice (first at row {first[name]})"
            )
        if name in existing:
            raise DataError(
                f"{_where(path, lineno, 1, header)}: class {name!r} already exists in the trained model (class id "
                f"{existing[name]}); give the new class another name, or pass --replace-classes to serve only the "
                "file's classes"
            )
        first[name] = lineno
        row = []
        for j, cell in enumerate(cells[1:], 2):
            try:
                v = float(cell) if cell else float("nan")
            except ValueError:
                raise DataError(f"{_where(path, lineno, j, header)}: {cell!r} is not a number") from None
            if not np.isfinite(v):
                what = "empty" if not cell else ("NaN" if np.isnan(v) else "infinite")
                raise DataError(
                    f"{_where(path, lineno, j, header)}: value is {what}; every class needs a finite value for "
                    "every attribute"
                )
            row.append(v)
        values_row = np.asarray(row, np.float64)
        if not np.any(np.maximum(values_row, 0.0) if nonnegative else values_row):
            raise DataError(
                f"{_where(path, lineno, 2, header)}: every attribute value of class {name!r} is zero"
                + (" after negatives are set to 0 (as the training data was)" if nonnegative else "")
                + "; such a class scores 0 on every image"
            )
        names.append(name)
        values.append(values_row)
        numbers.append(lineno)
    return ClassTable(names, np.stack(values), str(path), sha, numbers)


def _numbered_rows(text: str, delimiter: str):
    """``(row number, cells)`` of a CSV text, the row number of its first line."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    start = 1
    for cells in reader:
        yield start, cells
        start = reader.line_num + 1


def _check_header(path: Path, row: int, header: list, semantics: dict) -> None:
    if header[0].lower() != "class":
        raise DataError(
            f"{path}: row {row}, column 1: the header must start with 'class', got {header[0]!r} "
            "(first column: class, then one column per attribute)"
        )
    attributes = header[1:]
    names = semantics.get("attribute_names")
    k = len(names) if names else semantics.get("num_attributes")
    for j, a in enumerate(attributes, 2):
        if not a:
            raise DataError(f"{path}: row {row}, column {j}: empty attribute name in the header")
    if k is not None and len(attributes) != int(k):
        col = min(len(attributes), int(k)) + 2
        raise DataError(
            f"{path}: row {row}, column {col}: the header names {len(attributes)} attributes, the model has {k}"
            + (f" ({_short(names)})" if names else "")
        )
    if names:
        for j, (a, want) in enumerate(zip(attributes, names), 2):
            if a != want:
                raise DataError(
                    f"{path}: row {row}, column {j}: attribute {a!r}, the run's attribute {j - 1} is {want!r} "
                    "(the header must list the run's attribute names in their order)"
                )
    seen = {}
    for j, a in enumerate(attributes, 2):
        if a in seen:
            raise DataError(f"{path}: row {row}, column {j}: attribute {a!r} repeats column {seen[a]}")
        seen[a] = j


def _short(items, n: int = 3) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "")


# ---------------------------------------------------------------------------------------------
# Class sets and the re-targeted model


@dataclasses.dataclass
class ClassSet:
    """What a (re-targeted) model serves: names, model-ready rows, sides, provenance.

    Attributes:
        names: C' class names in class-id order.
        att: (C', K) float32 model-ready rows.
        seen_classes, unseen_classes: class ids by side (margin and calibrated stacking).
        status: per class ``trained-seen``, ``trained-unseen`` or ``added``.
        class_file: ``{"path", "sha256", "classes", "replace_classes", "added_side"}`` or None.
    """

    names: List[str]
    att: np.ndarray
    seen_classes: List[int]
    unseen_classes: List[int]
    status: List[str]
    class_file: Optional[dict] = None

    def describe(self) -> list:
        """``[{"id", "name", "status", "side"}]`` for the metadata."""
        unseen = set(self.unseen_classes)
        return [
            {"id": i, "name": n, "status": s, "side": "unseen" if i in unseen else "seen"}
            for i, (n, s) in enumerate(zip(self.names, self.status))
        ]


def trained_class_set(model, class_names: Sequence[str]) -> ClassSet:
    """The class set the model was trained with."""
    seen = sorted(int(c) for c in model.seen_classes)
    unseen = sorted(int(c) for c in model.unseen_classes)
    status = [TRAINED_UNSEEN if i in set(unseen) else TRAINED_SEEN for i in range(int(model.num_classes))]
    from keras import ops

    att = ops.convert_to_numpy(model.embedding.att)
    return ClassSet([str(n) for n in class_names], att.astype(np.float32), seen, unseen, status)


def class_set_with(
    model,
    semantics: dict,
    table: ClassTable,
    *,
    class_names: Optional[Sequence[str]] = None,
    replace: bool = False,
    added_side: str = "unseen",
) -> ClassSet:
    """The trained classes plus ``table``'s (or ``table``'s only, with ``replace``).

    Added classes take ``added_side`` (default ``"unseen"``: the margin's +bias and no
    calibrated-stacking ``gamma``, as the trained unseen classes). With ``replace``, a
    file row whose name is a trained class keeps that class's side and status
    (``trained-seen``/``trained-unseen``) with the file's description.

    Raises:
        MSDNError: ``added_side`` unknown, or no class on the unseen side (CZSL and the
            margin need one).
    """
    if added_side not in SIDES:
        raise MSDNError(f"added_side must be one of {SIDES}, got {added_side!r}")
    names = [str(n) for n in (class_names if class_names is not None else semantics.get("class_names") or [])]
    if len(names) != int(model.num_classes):
        raise MSDNError(f"{len(names)} class names for a model with {model.num_classes} classes")
    trained = trained_class_set(model, names)
    rule = semantics.get("normalisation") or normalisation_rule(False)
    rows = normalise_rows(table.values, rule)
    if rows.shape[1] != int(model.num_attributes):
        raise DataError(f"{table.path}: {rows.shape[1]} attributes, the model has {model.num_attributes}")
    new_side_unseen = added_side == "unseen"
    if replace:
        index = {n: i for i, n in enumerate(trained.names)}
        status, unseen = [], []
        for j, name in enumerate(table.names):
            i = index.get(name)
            status.append(ADDED if i is None else trained.status[i])
            if (i is None and new_side_unseen) or (i is not None and trained.status[i] == TRAINED_UNSEEN):
                unseen.append(j)
        out_names, att = list(table.names), rows
    else:
        out_names = trained.names + list(table.names)
        att = np.concatenate([trained.att, rows], axis=0)
        status = trained.status + [ADDED] * len(table.names)
        unseen = list(trained.unseen_classes) + (
            [len(trained.names) + j for j in range(len(table.names))] if new_side_unseen else []
        )
    unseen = sorted(unseen)
    if not unseen:
        raise MSDNError(
            f"{table.path}: no class on the unseen side: CZSL and the margin need at least one "
            "(add classes on the unseen side, the default)"
        )
    seen = [i for i in range(len(out_names)) if i not in set(unseen)]
    return ClassSet(
        out_names,
        att.astype(np.float32),
        seen,
        unseen,
        status,
        {
            "path": table.path,
            "sha256": table.sha256,
            "classes": len(table.names),
            "replace_classes": bool(replace),
            "added_side": added_side,
        },
    )


def retarget_model(model, classes: ClassSet):
    """The trained ``model`` over ``classes``: same weights, new ``att`` and ``mask_bias``.

    The attribute vectors ``V``, both sub-nets' weights and the margin size ``bias`` are
    copied; ``att`` is ``classes.att`` and the margin's sign follows ``classes``'s sides.
    The trained classes' logits are unchanged (they depend only on their own rows).
    """
    from msdn_tf.model import MSDN

    config = dict(model.get_config())
    config.update(
        num_classes=len(classes.names),
        seen_classes=list(classes.seen_classes),
        unseen_classes=list(classes.unseen_classes),
    )
    new = MSDN(**config, class_attributes=classes.att)
    new.build((None, None, int(model.feature_dim)))
    new.embedding.V.assign(model.embedding.V)
    for layer in ("a2v", "v2a"):
        old_w, new_w = getattr(model, layer).weights, getattr(new, layer).weights
        if [w.path.split("/")[-1] for w in old_w] != [w.path.split("/")[-1] for w in new_w]:
            raise MSDNError(f"cannot re-target: the {layer} weights of the model differ from a fresh MSDN's")
        for a, b in zip(new_w, old_w):
            a.assign(b)
    new.bias.assign(model.bias)
    return new


def retarget_run(run_dir, class_file, *, config=None, model=None, replace: bool = False, added_side: str = "unseen"):
    """``(model, ClassSet, semantics)`` of a run re-targeted to a class file (nothing is written)."""
    from msdn_tf.evaluation.runs import class_names_for_run, load_run

    if model is None or config is None:
        config, model = load_run(run_dir)
    semantics = run_class_semantics(run_dir, config, model)
    names = semantics.get("class_names") or class_names_for_run(run_dir, config)
    if len(names) != int(model.num_classes):
        names = class_names_for_run(run_dir, config)
    if semantics.get("num_attributes") is None:
        semantics["num_attributes"] = int(model.num_attributes)
    table = read_class_file(class_file, semantics, existing_names=() if replace else names)
    classes = class_set_with(model, semantics, table, class_names=names, replace=replace, added_side=added_side)
    return retarget_model(model, classes), classes, semantics


def normalise_rows_ops(raw, nonnegative: bool):
    """:func:`normalise_rows` in keras.ops, for a graph (``serving_open``): float64 inside, float32 out."""
    from keras import ops

    x = ops.cast(raw, "float64")
    if nonnegative:
        x = ops.maximum(x, 0.0)
    norm = ops.maximum(ops.sqrt(ops.sum(x * x, axis=1, keepdims=True)), NORM_EPS)
    return ops.cast(x / norm, "float32")


# ---------------------------------------------------------------------------------------------
# Measuring a re-targeted model


def evaluate_class_set(model, classes: ClassSet, data, *, gamma: float = 0.0, batch_size: int = 100) -> dict:
    """CZSL over the unseen side and GZSL U/S/H of a re-targeted model on ``data``'s test images.

    ``data``'s classes are matched to ``classes`` by name; test images (``test_seen_loc``
    and ``test_unseen_loc``) of a class the model does not serve are left out and counted.
    U averages over the classes on the unseen side that have test images (trained-unseen
    and added ones), S over the seen side; CZSL is the argmax over the unseen side only.
    The per-status figures (``added``, ``trained-unseen``, ``trained-seen``) are means of
    the per-class accuracies of that status, so the cost of the new classes is visible.

    Args:
        model: the re-targeted :class:`~msdn_tf.model.MSDN` (:func:`retarget_model`).
        classes: its :class:`ClassSet`.
        data: a :class:`~msdn_tf.data.base.ZSLData` holding test images of the served classes.
        gamma: calibrated stacking on top of the margin (seen side).
        batch_size: evaluation batch size.
    """
    from msdn_tf.evaluation.metrics import (
        czsl_predictions,
        gzsl_predictions,
        per_class_accuracies,
        zsl_metrics,
    )
    from msdn_tf.evaluation.predict import check_finite_outputs, predict_logits

    index = {n: i for i, n in enumerate(classes.names)}
    to_served = np.array([index.get(str(n), -1) for n in data.class_names], np.int64)
    rows = np.concatenate([np.asarray(data.test_seen_loc), np.asarray(data.test_unseen_loc)])
    served = to_served[data.labels[rows]]
    kept = rows[served >= 0]
    labels = served[served >= 0]
    if kept.size == 0:
        raise DataError(
            f"{data.source}: no test image belongs to a served class (class names of the data and of the "
            "class set do not match)"
        )
    missing = sorted({str(data.class_names[c]) for c in data.labels[rows[served < 0]]})
    logits = predict_logits(model, data, kept, batch_size)
    check_finite_outputs(model, data, kept, logits, "test images")
    fused = logits["logits"]
    unseen = np.asarray(classes.unseen_classes, np.int64)
    seen = np.asarray(classes.seen_classes, np.int64)
    on_unseen = np.isin(labels, unseen)
    result = zsl_metrics(
        fused[~on_unseen], labels[~on_unseen], fused[on_unseen], labels[on_unseen], seen, unseen, gamma=gamma
    )
    gzsl = gzsl_predictions(fused, seen, gamma)
    czsl = czsl_predictions(fused[on_unseen], unseen)
    gzsl_acc = per_class_accuracies(labels, gzsl, range(len(classes.names)))
    czsl_acc = per_class_accuracies(labels[on_unseen], czsl, unseen)
    by_status = {}
    for status in (ADDED, TRAINED_UNSEEN, TRAINED_SEEN):
        ids = [i for i, s in enumerate(classes.status) if s == status and i in gzsl_acc]
        entry = {"classes": len(ids), "gzsl": float(np.mean([gzsl_acc[i] for i in ids])) if ids else None}
        if status != TRAINED_SEEN:
            cz = [czsl_acc[i] for i in ids if i in czsl_acc]
            entry["czsl"] = float(np.mean(cz)) if cz else None
        by_status[status] = entry
    counts = np.bincount(labels, minlength=len(classes.names))
    per_class = [
        {
            "id": i,
            "name": classes.names[i],
            "status": classes.status[i],
            "images": int(counts[i]),
            "czsl": czsl_acc.get(i),
            "gzsl": gzsl_acc.get(i),
        }
        for i in range(len(classes.names))
    ]
    return {
        **{k: float(result[k]) for k in ("acc", "U", "S", "H")},
        "gamma": float(gamma),
        "chance_czsl": 1.0 / max(1, unseen.size),
        "by_status": by_status,
        "images": int(kept.size),
        "left_out_classes": missing,
        "per_class": per_class,
    }


def evaluate_run_with_classes(
    run_dir,
    class_file,
    *,
    data_dir=None,
    replace: bool = False,
    added_side: str = "unseen",
    gamma: float = 0.0,
    out_dir=None,
    data=None,
    log=print,
) -> dict:
    """``python -m msdn_tf.evaluate --run RUN --classes FILE.csv --data-dir DIR``: re-target, measure, report.

    Writes ``metrics.json`` and ``report.md`` to ``out_dir`` (default ``RUN/eval-classes``).
    """
    from msdn_tf.data.registry import load_dataset
    from msdn_tf.evaluation.runs import load_run
    from msdn_tf.utils import atomic_write_text, write_json

    run_dir = Path(run_dir)
    config, model = load_run(run_dir)
    retargeted, classes, _ = retarget_run(
        run_dir, class_file, config=config, model=model, replace=replace, added_side=added_side
    )
    if data_dir:
        config.data.data_dir = str(data_dir)
    data = data if data is not None else load_dataset(config)
    result = evaluate_class_set(retargeted, classes, data, gamma=gamma, batch_size=config.data.eval_batch_size)
    metrics = {"run_dir": str(run_dir), "data": data.source, "class_file": classes.class_file, **result}
    text = report_markdown(metrics)
    out_dir = Path(out_dir) if out_dir else run_dir / "eval-classes"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "report.md", text)
    log(text)
    log(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'report.md'}")
    return metrics


def _pct(x) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}"


def report_markdown(metrics: dict) -> str:
    """The markdown report of :func:`evaluate_run_with_classes`."""
    from msdn_tf.utils import markdown_table

    cf = metrics.get("class_file") or {}
    lines = [
        f"# Re-targeted model: {metrics.get('run_dir', '')}",
        "",
        f"Class file {cf.get('path')} (sha256 {str(cf.get('sha256'))[:16]}...), test images of {metrics.get('data')}; "
        f"gamma {metrics['gamma']:g} on top of the margin.",
        "",
        markdown_table(
            ["CZSL acc %", "GZSL U %", "GZSL S %", "GZSL H %", "CZSL chance %", "images"],
            [
                [
                    _pct(metrics["acc"]),
                    _pct(metrics["U"]),
                    _pct(metrics["S"]),
                    _pct(metrics["H"]),
                    _pct(metrics["chance_czsl"]),
                    metrics["images"],
                ]
            ],
        ),
        "",
        markdown_table(
            ["classes", "count", "CZSL acc %", "GZSL acc %"],
            [
                [status, e["classes"], _pct(e.get("czsl")), _pct(e["gzsl"])]
                for status, e in metrics["by_status"].items()
            ],
        ),
    ]
    if metrics.get("left_out_classes"):
        lines += ["", f"Test images of classes not served were left out: {_short(metrics['left_out_classes'], 10)}"]
    return "\n".join(lines) + "\n"
