"""Budgets for the readers of untrusted bytes, checked before the work (docs/reliability.md, "Limits").

Every file msdn-tf reads may come from somewhere else (a downloaded checkpoint, a
colleague's config, a run directory copied between machines). Each reader checks what
a file *declares* (its size, its nesting, the bytes its arrays will take) against a
budget before it builds anything, so that no small file can take unbounded memory or
time, and its error names the file, the limit and the constant that sets it:

======================  ==========================================================
constant                limit
======================  ==========================================================
MAX_YAML_BYTES          a YAML file (config, unseen-class list): 1 MiB
MAX_YAML_NODES          nodes a YAML document expands to, every alias counted at
                        each use: 10 000 (a resolved config has about 80)
MAX_YAML_DEPTH          nesting of YAML collections: 32 (a config needs 3)
MAX_YAML_SCALAR         characters in one YAML scalar: 65 536
MAX_JSON_BYTES          a JSON file (``state.json``, ``custom.json``, metadata): 64 MiB
MAX_TEXT_BYTES          a CSV or text list (image lists, class and attribute
                        tables, attribute vectors, unseen lists): 256 MiB (an image
                        list of a million images is about 100 MB)
ARRAY_RATIO, ARRAY_MIN  an array read whole (npz members, HDF5 datasets) may
                        take at most ARRAY_RATIO (64) times the bytes it occupies in
                        the file, or ARRAY_MIN (16 MiB) if more: compressed or
                        never-written data cannot expand without bound
======================  ==========================================================

The ``.pth`` reader's own limits (pickle size and depth, bytes materialised) live in
:mod:`msdn_tf.interop.torch_checkpoint`; the serving test double's in
:mod:`msdn_tf.serving.local_server`.

Example:
    >>> load_yaml_text("train: {seed: 3}", "inline")
    {'train': {'seed': 3}}
    >>> short_repr("x" * 500, limit=20)
    "'xxxxxxxxxxxxxxxxxxx... (500 characters)"
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Optional, Type

import yaml

from msdn_tf.errors import DataError, MSDNError

MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 32
MAX_YAML_SCALAR = 1 << 16
MAX_JSON_BYTES = 64 << 20
MAX_TEXT_BYTES = 256 << 20
ARRAY_RATIO = 64
ARRAY_MIN = 16 << 20

_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to about ``limit`` characters, in time and memory bounded by ``limit``.

    Containers are walked item by item and the walk stops once ``limit`` characters are
    out, so a list that holds itself, a structure of shared references that would print
    as gigabytes, or a huge integer costs no more than a short one.
    """
    out = []
    budget = [limit]

    def emit(text):
        if budget[0] > 0:
            out.append(text[: budget[0]])
        budget[0] -= len(text)

    def walk(v, depth):
        if budget[0] <= 0:
            return
        if isinstance(v, str):
            if len(v) > limit:
                emit(repr(v[:limit]))
                return
            emit(repr(v))
        elif isinstance(v, (bytes, bytearray)):
            emit(repr(bytes(v[:limit])))
        elif isinstance(v, bool) or v is None or isinstance(v, float):
            emit(repr(v))
        elif isinstance(v, int):
            emit(repr(v) if v.bit_length() <= 256 else "<integer of %d bits>" % v.bit_length())
        elif isinstance(v, (list, tuple, dict, set, frozenset)):
            if depth > 8:
                emit("...")
                return
            opening, closing = {list: "[]", tuple: "()", dict: "{}"}.get(type(v), "{}")
            emit(opening)
            items = v.items() if isinstance(v, dict) else v
            for i, item in enumerate(items):
                if budget[0] <= 0:
                    break
                if i:
                    emit(", ")
                if isinstance(v, dict):
                    walk(item[0], depth + 1)
                    emit(": ")
                    walk(item[1], depth + 1)
                else:
                    walk(item, depth + 1)
            emit(closing)
        else:
            emit("<%s object>" % type(v).__name__)

    walk(value, 0)
    text = "".join(out)
    if budget[0] < 0:
        size = len(value) if isinstance(value, (str, bytes, bytearray, list, tuple, dict, set, frozenset)) else None
        unit = "characters" if isinstance(value, str) else "bytes" if isinstance(value, (bytes, bytearray)) else "items"
        text = text[:limit] + ("... (%d %s)" % (size, unit) if size is not None else "...")
    return text


def short_text(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters (saying how long it was), control characters escaped."""
    text = str(text) if not isinstance(text, str) else text
    cut = text if len(text) <= limit else text[:limit]
    if not cut.isprintable():  # one line: control characters (newlines, tabs, ...) are escaped
        cut = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    if len(text) <= limit:
        return cut
    return "%s... (%d characters)" % (cut, len(text))


def check_file_size(path, limit: int, what: str, error: Type[MSDNError] = DataError, setting: str = "") -> int:
    """Refuse ``path`` if it is larger than ``limit`` bytes (before reading it); return its size."""
    size = os.path.getsize(path)
    if size > limit:
        raise error(
            "%s: %s of %d bytes is over the limit of %d bytes%s; is it the right file?"
            % (path, what, size, limit, " (%s)" % setting if setting else "")
        )
    return size


def check_text_file(path, what: str) -> int:
    """:func:`check_file_size` of a CSV or text list against :data:`MAX_TEXT_BYTES`."""
    return check_file_size(path, MAX_TEXT_BYTES, what, DataError, "MAX_TEXT_BYTES")


def read_text_file(path, limit: int, what: str, error: Type[MSDNError] = DataError, setting: str = "") -> str:
    """The UTF-8 text of ``path`` (a BOM is dropped), at most ``limit`` bytes, checked before reading.

    A file that is not UTF-8 is one error naming the byte offset, not a traceback.
    """
    size = check_file_size(path, limit, what, error, setting)
    with open(path, "rb") as fh:
        raw = fh.read(size + 1)  # read(n) reserves n bytes: the size just checked, not the limit
    if len(raw) > size:  # it grew while we looked
        raise error(
            "%s: %s is over the limit of %d bytes%s" % (path, what, limit, " (%s)" % setting if setting else "")
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(
            "%s: %s is not UTF-8 text (byte 0x%02x at offset %d); save it as UTF-8"
            % (path, what, raw[exc.start], exc.start)
        ) from None


class _YAMLBudget(Exception):
    def __init__(self, message, mark=None):
        super().__init__(message)
        self.line = None if mark is None else mark.line + 1


def _check_yaml_events(text: str, source: str, loader) -> None:
    """One streaming pass over the YAML events: nesting, expansion, scalar size, duplicate keys."""
    frames = []  # [kind, anchor, start_total, keys, key_path, expect_key]
    anchors = {}
    open_anchors = set()
    total = 0

    def add_node(event, size, key_text=None):
        nonlocal total
        total += size
        if total > MAX_YAML_NODES:
            raise _YAMLBudget(
                "expands to more than %d nodes (aliases count at each use; MAX_YAML_NODES)" % MAX_YAML_NODES,
                event.start_mark,
            )
        if frames and frames[-1][0] == "map":
            frame = frames[-1]
            if frame[5]:  # this node is a key
                if key_text is not None:
                    name = key_text
                    path = ".".join(frame[4] + [name])
                    first = frame[3].get(name)
                    if first is not None:
                        raise _YAMLBudget(
                            "key '%s' appears twice (lines %d and %d); each key may appear once"
                            % (short_text(path, 80), first, event.start_mark.line + 1),
                            event.start_mark,
                        )
                    frame[3][name] = event.start_mark.line + 1
                    frame[6] = name
                else:
                    frame[6] = None
            frame[5] = not frame[5]

    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.ScalarEvent):
            if len(event.value) > MAX_YAML_SCALAR:
                raise _YAMLBudget(
                    "has a value of %d characters, over the limit of %d (MAX_YAML_SCALAR)"
                    % (len(event.value), MAX_YAML_SCALAR),
                    event.start_mark,
                )
            if event.anchor:
                anchors[event.anchor] = 1
            key_text = None
            if event.tag is None or event.tag == "tag:yaml.org,2002:str":
                key_text = event.value if event.value != "<<" or event.implicit == (False, False) else None
            add_node(event, 1, key_text)
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(frames) >= MAX_YAML_DEPTH:
                raise _YAMLBudget("is nested deeper than %d levels (MAX_YAML_DEPTH)" % MAX_YAML_DEPTH, event.start_mark)
            # The collection counts as a node of its parent now (a key position is toggled).
            key_path = []
            if frames and frames[-1][0] == "map":
                key_path = frames[-1][4] + ([frames[-1][6]] if frames[-1][6] is not None else [])
            elif frames:
                key_path = list(frames[-1][4])
            add_node(event, 1)
            kind = "map" if isinstance(event, yaml.MappingStartEvent) else "seq"
            if event.anchor:
                open_anchors.add(event.anchor)
            frames.append([kind, event.anchor, total, {}, key_path, True, None])
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            frame = frames.pop()
            if frame[1]:
                anchors[frame[1]] = total - frame[2] + 1
                open_anchors.discard(frame[1])
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor in open_anchors:
                raise _YAMLBudget(
                    "has alias *%s inside the collection it names" % short_text(event.anchor, 40), event.start_mark
                )
            add_node(event, anchors.get(event.anchor, 1))


def load_yaml_text(text: str, source: str, error: Type[MSDNError] = DataError) -> Any:
    """Parse one YAML document within the budgets of this module; every failure is ``error``.

    Checked in one streaming pass over the parser's events before any node is built:
    nesting (``MAX_YAML_DEPTH``), the size the document expands to with every alias
    counted at each use (``MAX_YAML_NODES``; an alias bomb of 560 bytes is refused at
    once), scalar length (``MAX_YAML_SCALAR``), aliases of a collection inside itself, and
    duplicate keys (an error naming both lines, including a whole section given twice).
    YAML merge keys (``<<: *base``) are not duplicates.

    Args:
        text: the YAML text.
        source: the file name (or ``--set ...``) for messages.
        error: the exception class raised.
    """
    try:
        _check_yaml_events(text, source, _SAFE_LOADER)
        return yaml.load(text, Loader=_SAFE_LOADER)
    except _YAMLBudget as exc:
        where = " line %d:" % exc.line if exc.line else ""
        raise error("%s:%s the YAML %s" % (source, where, exc)) from None
    except yaml.YAMLError as exc:
        text = " ".join(str(exc).split())  # one line
        raise error("%s: not valid YAML (%s)" % (source, short_text(text, 300))) from None
    except RecursionError:  # not reachable with MAX_YAML_DEPTH, kept as a last line
        raise error("%s: the YAML is nested too deeply" % source) from None


def load_yaml_file(path, what: str = "YAML file", error: Type[MSDNError] = DataError) -> Any:
    """:func:`load_yaml_text` of a file of at most ``MAX_YAML_BYTES`` (checked before reading)."""
    return load_yaml_text(read_text_file(path, MAX_YAML_BYTES, what, error, "MAX_YAML_BYTES"), str(path), error)


def load_json_file(path, what: str = "JSON file", error: Type[MSDNError] = DataError, limit: Optional[int] = None):
    """A JSON file of at most ``limit`` (default ``MAX_JSON_BYTES``) bytes; malformed JSON is ``error``."""
    limit = MAX_JSON_BYTES if limit is None else limit
    text = read_text_file(path, limit, what, error, "MAX_JSON_BYTES")
    try:
        return json.loads(text)
    except RecursionError:
        raise error("%s: %s is JSON nested too deeply" % (path, what)) from None
    except ValueError as exc:
        raise error("%s: %s is not valid JSON (%s)" % (path, what, short_text(str(exc), 200))) from None


def array_budget(stored_bytes: int) -> int:
    """Most bytes an array occupying ``stored_bytes`` in its file may take once read."""
    return max(ARRAY_MIN, ARRAY_RATIO * int(stored_bytes))


def check_array_bytes(declared: int, stored: int, source: str, what: str) -> None:
    """Refuse an array that declares ``declared`` bytes but occupies only ``stored`` in the file."""
    if declared > array_budget(stored):
        raise DataError(
            "%s: %s declares %d bytes of data but occupies %d bytes in the file; more than %d times "
            "that (or %d bytes) is refused before reading (ARRAY_RATIO, ARRAY_MIN: compressed or "
            "never-written data); the file is crafted or corrupt"
            % (source, what, declared, stored, ARRAY_RATIO, ARRAY_MIN)
        )


def check_hdf5_dataset(ds, source: str) -> None:
    """Before reading an HDF5 dataset whole: its declared size against the bytes it stores."""
    try:
        stored = int(ds.id.get_storage_size())
    except Exception:  # noqa: BLE001 - external links and the like: nothing to compare with
        return
    declared = int(ds.size) * int(ds.dtype.itemsize)
    check_array_bytes(declared, stored, source, "dataset '%s'" % short_text(ds.name, 80))


def check_npz(path) -> None:
    """Before ``np.load`` of an ``.npz``: each member's declared array size against its stored size.

    Reads only the zip directory and each member's ``.npy`` header.
    """
    import numpy as np

    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                if info.file_size > array_budget(info.compress_size) + 4096:
                    check_array_bytes(
                        info.file_size, info.compress_size, str(path), "member '%s'" % short_text(info.filename, 80)
                    )
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                count = 1
                for n in shape:
                    count *= int(n)
                check_array_bytes(
                    count * dtype.itemsize, info.compress_size, str(path), "member '%s'" % short_text(info.filename, 80)
                )
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError("%s: not a readable .npz archive (%s)" % (path, short_text(str(exc), 200))) from None


def check_keras_archive(path) -> None:
    """Before ``keras.saving.load_model``: the weights an MSDN ``.keras`` archive declares.

    Keras creates every variable at the shapes ``config.json`` declares before it reads
    ``model.weights.h5``, so a 17 KB archive whose config says ``feature_dim: 8000,
    embed_dim: 8000`` takes 1.5 GB (quadratic: 30 000 takes 14 GB). The MSDN configs in
    the archive (``num_classes`` C, ``num_attributes`` K, ``feature_dim`` F, ``embed_dim``
    D) give the bytes of V (K, D), att (C, K), W_1, W_2, W_2_1 (D, F), W_1_1 (F, D) and
    the margins; they are checked against the bytes the weights file occupies
    (:func:`check_array_bytes`). Archives that are not zips, or hold no MSDN, are left to
    Keras (and its own messages).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                info = zf.getinfo("config.json")
            except KeyError:
                return
            if info.file_size > MAX_JSON_BYTES:
                raise DataError(
                    "%s: config.json of %d bytes is over the limit of %d bytes (MAX_JSON_BYTES)"
                    % (path, info.file_size, MAX_JSON_BYTES)
                )
            config = json.loads(zf.read(info).decode("utf-8"))
            names = zf.namelist()
            stored = zf.getinfo("model.weights.h5").compress_size if "model.weights.h5" in names else 0
    except DataError:
        raise
    except RecursionError:
        raise DataError("%s: config.json is JSON nested too deeply" % path) from None
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError):
        return  # Keras reports a broken archive in its own words
    declared, shapes = 0, []
    stack = [(config, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > 64:
            raise DataError("%s: config.json is nested deeper than 64 levels" % path)
        if isinstance(node, dict):
            if node.get("class_name") == "MSDN" and isinstance(node.get("config"), dict):
                cfg = node["config"]
                dims = [cfg.get(k) for k in ("num_classes", "num_attributes", "feature_dim", "embed_dim")]
                if not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < (1 << 31) for d in dims):
                    raise DataError(
                        "%s: the MSDN config's num_classes, num_attributes, feature_dim and embed_dim must be "
                        "positive integers below 2**31, got %s" % (path, short_repr(dims))
                    )
                c, k, f, d = dims
                declared += 4 * (k * d + c * k + 4 * d * f + 2 * c + 1)
                shapes.append("C=%d, K=%d, F=%d, D=%d" % (c, k, f, d))
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
    if declared:
        check_array_bytes(declared, stored, str(path), "the model (MSDN %s) weights" % "; ".join(shapes[:3]))
