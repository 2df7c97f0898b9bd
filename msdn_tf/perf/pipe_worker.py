"""A benchmark's worker process, driven over pipes: one line per request, one line per reply.

The benchmarks that time something in another process (another Keras backend,
:mod:`msdn_tf.perf.backend_compare`; torchvision under another interpreter,
:mod:`msdn_tf.perf.extraction_speed`) start it through :class:`PipeWorker`: requests go to
its stdin, replies come from its stdout, each read within a time budget; its stderr goes to
a temporary file (never a pipe nobody reads, which would block a chatty worker), so a worker
that dies is reported with the last line it wrote there.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import tempfile

from msdn_tf.errors import MSDNError


def require_executable(path: str, what: str) -> None:
    """Raise :class:`MSDNError` ``"<what>: not an executable file"`` unless ``path`` is one."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise MSDNError(f"{what}: not an executable file")


class PipeWorker:
    """A child process that answers each line written to its stdin with one line on its stdout.

    Args:
        argv: the command (``argv[0]`` must be an executable file).
        name: how errors name the worker, e.g. ``"--torch-python PY"``.
        env, cwd: the child's environment and working folder (default: this process's).
        hint: appended to the message when the worker dies, e.g. how to see why.

    Example:
        >>> worker = PipeWorker([sys.executable, "-c", CODE], "the jax benchmark worker")
        >>> worker.send({"regions": 49}); reply = worker.receive_json(600, "starting")
        >>> worker.close()
    """

    def __init__(self, argv, name: str, env=None, cwd=None, hint: str = ""):
        require_executable(argv[0], name)
        self.name, self.hint = name, hint
        self._stderr = tempfile.TemporaryFile("a+", encoding="utf-8")  # O_APPEND: reads never move its writes
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=cwd,
        )

    def send(self, message) -> None:
        """Write one line: ``message`` itself if a string, else its JSON."""
        self.proc.stdin.write((message if isinstance(message, str) else json.dumps(message)) + "\n")
        self.proc.stdin.flush()

    def receive(self, budget_s=None, what: str = "running") -> str:
        """The worker's next line (stripped), waiting at most ``budget_s`` seconds (``None``: no limit).

        Raises:
            MSDNError: the budget ran out (the worker is killed), or the worker exited.
        """
        if budget_s is not None:
            with selectors.DefaultSelector() as sel:
                sel.register(self.proc.stdout, selectors.EVENT_READ)
                if not sel.select(timeout=budget_s):
                    self.proc.kill()  # stuck: it would not read a polite "quit" either
                    self.proc.wait()
                    self.fail(f"took over {budget_s:.0f} s {what}")
        line = self.proc.stdout.readline()
        if not line:
            self._stop()
            self.fail(f"exited with code {self.proc.returncode} while {what}: {self.last_stderr_line()}")
        return line.strip()

    def receive_json(self, budget_s=None, what: str = "running"):
        """The next line parsed as JSON; a line that is not JSON fails naming it."""
        line = self.receive(budget_s, what)
        try:
            return json.loads(line)
        except ValueError:
            self.fail(f"answered {line[:200]!r} while {what}, not a JSON line")

    def last_stderr_line(self) -> str:
        """The last non-empty line the worker wrote to stderr so far (``"no message"`` if none)."""
        self._stderr.seek(0)
        lines = [t.strip() for t in self._stderr.read().splitlines() if t.strip()]
        return lines[-1] if lines else "no message"

    def fail(self, message: str):
        """Stop the worker and raise :class:`MSDNError` ``"<name>: <message><hint>"``."""
        self.close()
        raise MSDNError(f"{self.name}: {message}{self.hint}")

    def _stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        """Stop the worker (``quit``, then kill after 60 s) and drop its stderr file."""
        self._stop()
        self._stderr.close()
