"""Small I/O helpers: atomic writes, JSON, markdown tables."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

VERBOSE_ENV = "MSDN_TF_VERBOSE"
TF_LOG_ENV = "TF_CPP_MIN_LOG_LEVEL"
QUIET_TF_LOG_LEVEL = "3"  # FATAL only: hides TensorFlow's C++ INFO, WARNING and ERROR lines


def verbose_env() -> bool:
    """Whether ``MSDN_TF_VERBOSE`` asks for TensorFlow's own output (anything but empty or 0)."""
    return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


def subprocess_env(env=None) -> dict:
    """A child process's environment with this process's TensorFlow log setting.

    Args:
        env: the environment to start from (default a copy of ``os.environ``).

    Example:
        >>> subprocess_env({"PATH": "/bin"})["TF_CPP_MIN_LOG_LEVEL"]  # '3' unless verbose
        '3'
    """
    env = dict(os.environ if env is None else env)
    if not verbose_env():
        env.setdefault(TF_LOG_ENV, QUIET_TF_LOG_LEVEL)
    return env


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    Nothing is left half-written: on an exception the temporary file is removed
    and ``path`` keeps its previous content.

    Example:
        >>> with atomic_path("out.h5") as tmp:
        ...     model.save_weights(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"  # keep e.g. ".weights.h5", which Keras checks
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.remove(tmp)  # writers such as h5py want to create the file themselves
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None:  # e.g. ENOSPC raised by a writer: name the file being written
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path, obj) -> None:
    """Write ``obj`` as strict JSON, atomically.

    NaN and infinities are not JSON: a non-finite number raises
    :class:`~msdn_tf.errors.MSDNError` naming the file and the key, and nothing is written.
    """
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    except ValueError as exc:
        from msdn_tf.errors import NonFiniteError

        raise NonFiniteError(
            f"{path}: not written, {_first_nonfinite(obj) or 'a value'} is NaN or infinite ({exc})"
        ) from exc
    atomic_write_text(path, text + "\n")


def _first_nonfinite(obj, where=""):
    """The key path (``a.b[3]``) of the first NaN or infinite number in ``obj``, or ``None``."""
    import math

    import numpy as np

    if isinstance(obj, (float, np.floating)):
        return None if math.isfinite(float(obj)) else (where or "the value")
    if isinstance(obj, np.ndarray):
        return None if np.all(np.isfinite(obj)) or obj.dtype.kind not in "fc" else (where or "the array")
    if isinstance(obj, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for key, value in items:
        found = _first_nonfinite(value, key)
        if found:
            return found
    return None


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub-markdown table; floats printed with two decimals."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    rows = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)
