"""Attribute word vectors from a word-vector text file (docs/reference.md §1.3).

The reference ``{CUB,SUN,AWA2}_attribute.pkl`` files hold, for each attribute
name, the SUM of the word vectors of its words; rows are not normalised. This
module computes the same thing for any attribute names and any vectors file in
the two standard text formats:

* word2vec text format: a header line ``"N D"`` (number of words, dimension),
  then ``word v1 ... vD`` per line;
* GloVe: the same lines without a header.

Plain or gzip-compressed (``.gz``). The file is streamed line by line and only
the vectors of the words needed are kept, so a multi-gigabyte file is never
loaded into memory. A word is matched exactly first; failing that, the first
case-insensitive match is used (word2vec GoogleNews has ``Red`` and ``red``).
The binary word2vec format is not read: convert it to text first.

Example::

    from msdn_tf.data.wordvectors import attribute_words, attribute_vectors
    attribute_words("has_bill_shape::curved_(up_or_down)")
    # ['has', 'bill', 'shape', 'curved', 'up', 'or', 'down']
    vectors, report = attribute_vectors(["has_color::red"], "glove.6B.300d.txt.gz")
"""

from __future__ import annotations

import gzip
import io
import os
import re
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from msdn_tf.errors import DataError
from msdn_tf.limits import short_repr

_NON_LETTERS = re.compile(r"[^a-zA-Z]+")

#: Longest line read (characters): a 300-d GloVe line is about 3 000; a file without line
#: breaks (or a gzip bomb of one line) is refused when a line reaches this, before it is kept.
MAX_LINE_CHARS = 1 << 20
#: Largest vector dimension (a word2vec header is refused above it before anything is allocated).
MAX_DIM = 1 << 16


def _lines(fh, path: str):
    """``(lineno, line)`` of ``fh``, each line read with a bound of :data:`MAX_LINE_CHARS`."""
    lineno = 0
    while True:
        line = fh.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        lineno += 1
        if len(line) > MAX_LINE_CHARS:
            raise DataError(
                f"{path}: line {lineno} is longer than {MAX_LINE_CHARS} characters (MAX_LINE_CHARS); "
                "a word-vector file has one word and its numbers per line"
            )
        yield lineno, line


def attribute_words(name: str) -> list:
    """The words of an attribute name: split on every non-letter, lower-cased.

    ``"has_bill_shape::curved_(up_or_down)"`` -> ``["has", "bill", "shape", "curved",
    "up", "or", "down"]``; ``"man-made"`` -> ``["man", "made"]``. Digits are dropped.
    """
    return [w.lower() for w in _NON_LETTERS.split(str(name)) if w]


def _open_text(path: str):
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: word-vector file not found")
    raw = gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline=None)


def _is_header(parts: Sequence[str]) -> bool:
    return len(parts) == 2 and all(p.isdigit() for p in parts)


def _parse_vector(path: str, lineno: int, token: str, rest: str, dim: int, users: Sequence[str]) -> np.ndarray:
    """The ``dim`` finite numbers after ``token`` on line ``lineno``; ``users`` (attributes) name it in errors."""
    values = rest.split()
    if len(values) != dim:
        raise DataError(f"{path}: line {lineno} ({short_repr(token)}) has {len(values)} numbers, expected {dim}")
    try:
        vec = np.asarray(values, dtype=np.float64)
    except ValueError as exc:
        raise DataError(
            f"{path}: line {lineno} ({short_repr(token)}) holds a value that is not a number "
            f"({short_repr(str(exc), 200)})"
        ) from None
    if not np.all(np.isfinite(vec)):
        raise DataError(
            f"{path}: line {lineno}: the vector of {short_repr(token)} holds NaN or infinite "
            f"values (needed by attribute(s) {', '.join(map(repr, users[:5])) or '?'}); "
            "fix the line or use another word-vector file"
        )
    return vec


def read_word_vectors(
    path: str, words: Iterable[str], words_of: Optional[Dict[str, Sequence[str]]] = None
) -> Tuple[Dict[str, np.ndarray], dict]:
    """Stream ``path`` and keep the vectors of ``words`` only.

    Args:
        path: word2vec text (``"N D"`` header) or GloVe (no header) file, optionally ``.gz``.
        words: the words wanted (compared exactly, then case-insensitively).
        words_of: optional ``{attribute name: its words}``, to name the attributes in errors.

    Returns:
        ``(vectors, info)``: ``{word: float64 (D,)}`` for the words found and
        ``{"format": "word2vec"|"glove", "dim": D, "lines": lines read}``.

    Raises:
        DataError: naming the file and line of a malformed row, a dimension that
            changes, a NaN or infinite value, a binary file or an empty one.
    """
    words_of = dict(words_of or {})
    wanted = set(words)
    lowered = {w.lower(): w for w in wanted}
    exact: Dict[str, np.ndarray] = {}
    folded: Dict[str, np.ndarray] = {}
    fmt, dim, lineno = "glove", None, 0
    try:
        with _open_text(path) as fh:
            for lineno, line in _lines(fh, path):
                if lineno == 1:
                    parts = line.split()
                    if _is_header(parts):
                        fmt, dim = "word2vec", int(parts[1])
                        if not 0 < dim <= MAX_DIM:
                            raise DataError(
                                f"{path}: line 1: the word2vec header gives dimension {short_repr(parts[1], 40)}; "
                                f"expected 1 to {MAX_DIM} (MAX_DIM)"
                            )
                        continue
                # only split the numbers of a wanted word: the first token decides
                head = line.split(None, 1)
                if not head:
                    continue
                token, rest = head[0], (head[1] if len(head) > 1 else "")
                if dim is None:
                    dim = len(rest.split())
                    if dim > MAX_DIM:
                        raise DataError(
                            f"{path}: line {lineno} holds {dim} numbers; at most {MAX_DIM} are read (MAX_DIM)"
                        )
                    if dim == 0:
                        raise DataError(
                            f"{path}: line {lineno} has a word but no numbers; expected "
                            "'word v1 ... vD' (GloVe) or an 'N D' header (word2vec text)"
                        )
                hit_exact = token in wanted and token not in exact
                key = lowered.get(token.lower())
                hit_folded = not hit_exact and key is not None and key not in exact and key not in folded
                if not (hit_exact or hit_folded):
                    continue
                users = [n for n, ws in words_of.items() if (token if hit_exact else key) in ws]
                vec = _parse_vector(path, lineno, token, rest, dim, users)
                if hit_exact:
                    exact[token] = vec
                    folded.pop(token, None)
                else:
                    folded[key] = vec
                if len(exact) == len(wanted):
                    break
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text near line {lineno + 1} ({exc.reason}); binary word2vec files "
            "are not supported, convert them to the text format first"
        ) from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the word-vector file ({exc})") from exc
    if dim is None:
        raise DataError(f"{path}: the word-vector file is empty")
    vectors = {**folded, **exact}
    return vectors, {"format": fmt, "dim": int(dim), "lines": int(lineno)}


def attribute_vectors(
    names: Sequence[str],
    path: str,
    *,
    allow_missing_words: bool = False,
    allow_zero_vectors: bool = False,
    warn: Optional[Callable[[str], None]] = None,
) -> Tuple[np.ndarray, dict]:
    """``(K, D)`` attribute vectors: the sum of the word vectors of each name (§1.3).

    Args:
        names: ``K`` attribute names (cleaned with :func:`attribute_words`).
        path: the word-vector file (see :func:`read_word_vectors`).
        allow_missing_words: words absent from the file are skipped with a warning
            instead of raising.
        allow_zero_vectors: attributes left with an all-zero vector (none of their
            words found) are accepted with a warning (the reference SUN file has
            one) instead of raising.
        warn: called with warning lines (default: ignored).

    Returns:
        ``(vectors, report)``: float64 ``(K, D)`` rows, not normalised, and
        ``{"file", "format", "dim", "words", "missing_words": {word: [attributes]},
        "zero_attributes": [names]}``.

    Raises:
        DataError: an attribute name without any letter; missing words (unless
            allowed), all-zero attributes (unless allowed), a malformed file.
    """
    warn = warn or (lambda msg: None)
    words_of = [attribute_words(n) for n in names]
    empty = [n for n, w in zip(names, words_of) if not w]
    if empty:
        raise DataError(f"attribute names without any letters cannot be looked up in {path}: {empty[:10]}")
    needed = sorted({w for ws in words_of for w in ws})
    found, info = read_word_vectors(path, needed, words_of={str(n): ws for n, ws in zip(names, words_of)})
    missing: Dict[str, list] = {}
    out = np.zeros((len(names), info["dim"]), dtype=np.float64)
    for i, (name, ws) in enumerate(zip(names, words_of)):
        for w in ws:
            if w in found:
                out[i] += found[w]
            else:
                missing.setdefault(w, []).append(str(name))
    zero = [str(n) for n, row in zip(names, out) if not np.any(row)]
    report = {
        "file": str(path),
        **info,
        "words": len(needed),
        "found_words": len(found),
        "missing_words": missing,
        "zero_attributes": zero,
    }
    if missing:
        listing = "; ".join(
            f"{w!r} (in {', '.join(a[:3])}{', ...' if len(a) > 3 else ''})" for w, a in sorted(missing.items())
        )
        msg = f"{path}: {len(missing)} of {len(needed)} attribute words are not in the word-vector file: {listing}"
        if not allow_missing_words:
            raise DataError(
                msg + ". Use another vectors file, rename the attributes, give the vectors "
                "directly (--attribute-vectors) or pass --allow-missing-words to skip them"
            )
        warn("warning: " + msg + " (skipped)")
    if zero:
        msg = f"{path}: {len(zero)} attribute(s) got an all-zero vector (none of their words found): {zero[:20]}"
        if not allow_zero_vectors:
            raise DataError(
                msg + ". Pass --allow-zero-vectors to accept them (they then carry no word-vector information)"
            )
        warn("warning: " + msg)
    return out, report
