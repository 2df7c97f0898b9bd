"""One writer per run directory: the lock file ``<run_dir>/.msdn-lock``.

Every command that writes a run directory (``train``, ``train --resume``, ``convert``,
``custom run``, the protocols and ablations through :func:`~msdn_tf.training.loop.run_training`)
holds the lock while it writes. The file holds the holder's process id, host name,
command and start time as JSON; it is created with ``O_CREAT | O_EXCL``, so of two
commands started together exactly one gets it. The other is refused with a message
naming the holder. A lock left by a process that no longer runs on this host (killed,
power loss) is taken over with a note; a lock of another host is never taken over (its
process cannot be checked from here): the message says which file to remove once that
process is known to be gone.

Readers (``evaluate``, ``export``, ``visualize``) call :func:`writer_of` and say that
the run is being written instead of advising ``--resume``.

Example:
    >>> with RunLock("runs/demo", "train"):
    ...     ...  # write the run
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Optional

from msdn_tf.errors import MSDNError

LOCK_FILE = ".msdn-lock"

_HELD: dict = {}  # resolved lock path -> depth (the same process may nest, e.g. custom run -> train)


def _describe(holder: dict) -> str:
    return (
        f"{holder.get('command', 'a command')} (process {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"since {holder.get('started', '?')})"
    )


def _alive(pid) -> bool:
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def read_holder(run_dir) -> Optional[dict]:
    """The holder recorded in ``run_dir``'s lock file, or None when there is none (or it is unreadable)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "command": "an unknown command", "unreadable": True}
    return holder if isinstance(holder, dict) else {"pid": None, "host": None, "command": "an unknown command"}


def is_live(holder: Optional[dict]) -> bool:
    """Whether ``holder`` may still be writing: a live process on this host, or any process on another host."""
    if holder is None:
        return False
    if holder.get("host") != socket.gethostname():
        return holder.get("host") is not None
    return _alive(holder.get("pid")) and int(holder.get("pid")) != os.getpid()


def writer_of(run_dir) -> Optional[str]:
    """``"train (process N on HOST, since T)"`` if another process is writing ``run_dir`` now, else None."""
    holder = read_holder(run_dir)
    return _describe(holder) if is_live(holder) else None


class RunLock:
    """Hold ``<run_dir>/.msdn-lock`` for the block; refuse if another live process holds it.

    Args:
        run_dir: the run directory (created if absent).
        command: what is writing, for the other commands' messages (e.g. ``"train"``).
        log: where the note about a taken-over stale lock goes.

    Raises:
        MSDNError: another process holds the lock (the message names it).
    """

    def __init__(self, run_dir, command: str, log: Callable[[str], None] = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.command = command
        self.log = log or (lambda text: print(text, file=sys.stderr))
        self.created_dir = False

    def __enter__(self) -> "RunLock":
        key = str(self.path.resolve())
        if _HELD.get(key):
            _HELD[key] += 1
            return self
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise MSDNError(f"{self.run_dir}: is a file, not a folder; choose another run directory")
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f)
            _HELD[key] = 1
            return self
        raise MSDNError(f"{self.path}: could not take the run directory's lock; try again")

    def _take_over_or_refuse(self) -> None:
        holder = read_holder(self.run_dir)
        if holder is None:
            return  # released meanwhile: try again
        if is_live(holder):
            advice = (
                f"; if that process is gone, remove {self.path} and run again"
                if holder.get("host") != socket.gethostname()
                else ""
            )
            raise MSDNError(
                f"{self.run_dir} is being written by {_describe(holder)}; {self.command} refused: "
                f"wait for it to finish, or choose another run directory{advice}"
            )
        if holder.get("unreadable") and holder.get("pid") is None:
            why = "an unreadable lock"
        else:
            why = f"the lock of {_describe(holder)}, which no longer runs"
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.log(f"note: {self.run_dir}: took over {why} (it was killed or crashed while writing this run)")

    def __exit__(self, *exc) -> None:
        key = str(self.path.resolve())
        _HELD[key] -= 1
        if _HELD[key]:
            return
        del _HELD[key]
        holder = read_holder(self.run_dir)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self.created_dir:  # a command that failed before writing leaves no empty folder behind
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only succeeds when empty
