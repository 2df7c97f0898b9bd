"""Exceptions with messages that tell the user what to fix (the commands print them as one line:
:func:`msdn_tf.cli.common.report_error`)."""

from __future__ import annotations

import errno
import re


class MSDNError(Exception):
    """Base class for errors the command-line tools report without a traceback."""


class ConfigError(MSDNError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, value out of range)."""


class DataError(MSDNError, ValueError):
    """A data file is missing, corrupt or inconsistent.

    The message always names the file (and the key, where there is one) and
    what was expected.
    """


class NonFiniteError(MSDNError, FloatingPointError):
    """Training or evaluation met a NaN or infinite value; the message names the step and where."""


_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free space (or choose a folder on another disk) and run again",
    errno.EDQUOT: "disk quota exceeded; free space and run again",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder you can write to (or fix its permissions)",
    errno.EPERM: "operation not permitted; choose a folder you can write to",
    errno.ENOTDIR: "a path component is a file, not a folder; choose a folder",
    errno.EISDIR: "is a folder where a file was expected",
    errno.EEXIST: "already exists and is not a folder; choose another path",
    errno.ENOENT: "does not exist",
}


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error: the path, what went wrong and what to do.

    Example:
        >>> describe_os_error(OSError(errno.ENOSPC, "No space left on device", "runs/x/model.keras"))
        'runs/x/model.keras: no space left on the device; free space ...'
    """
    where = exc.filename if exc.filename is not None else None
    if getattr(exc, "filename2", None):
        where = f"{where} -> {exc.filename2}"
    code, text = exc.errno, str(exc)
    # h5py may put the errno and the file name only into its message
    if code is None:
        found = re.search(r"errno = (\d+)", text)
        code = int(found.group(1)) if found else None
    if where is None:
        named = re.search(r"name = '([^']+)'", text)
        where = named.group(1) if named else None
    detail = (exc.strerror or text or type(exc).__name__).strip().splitlines()[0][:200]
    what = _OS_ADVICE.get(code) or detail
    head = f"{where}: " if where else ""
    return f"{head}{what} ({detail}); files written before are unchanged."
