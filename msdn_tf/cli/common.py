"""The shared command helper: error tail, common flags and TensorFlow's start-up noise.

Every ``python -m msdn_tf.<command>`` (and console script) uses this module:

* :func:`cli_main` decorates a command's ``main(argv)``: :class:`~msdn_tf.errors.MSDNError`
  and ``OSError`` become one ``error: ...`` line on stderr and exit status 2 (no traceback);
  it also accepts ``--verbose`` on every command;
* :func:`add_common_flags` adds the flags that commands repeat (``--dataset``,
  ``--data-dir``, ``--config``, ``--set``, ``--verbose``); :func:`config_from_common_flags`
  resolves the config they name; :func:`add_report_flag` and :func:`print_report` give the
  benchmarks their ``--json [FILE]`` and short table;
* :func:`quiet_tensorflow_startup` hides TensorFlow's C++ start-up lines (``WARNING: All log
  messages before absl::InitializeLog()``, the oneDNN and ``cudart_stub`` INFO lines,
  ``failed call to cuInit``, ``NodeDef mentions attribute use_unbounded_threadpool``). It is
  installed once, by importing :mod:`msdn_tf.cli` (only commands do), before anything can import
  TensorFlow: it sets ``TF_CPP_MIN_LOG_LEVEL=3`` (unless already set) and silences file
  descriptor 2 while ``import tensorflow`` runs, because the first lines are written before
  TensorFlow's log level is read. If that import fails, what it wrote is printed. Python
  errors and msdn-tf's own messages are not affected.

``--verbose`` on any command, or ``MSDN_TF_VERBOSE=1``, shows everything TensorFlow writes.
This module imports only the standard library and :mod:`msdn_tf.errors` / :mod:`msdn_tf.utils`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.abc
import importlib.util
import os
import sys
import tempfile

from msdn_tf.errors import MSDNError, describe_os_error
from msdn_tf.utils import QUIET_TF_LOG_LEVEL, TF_LOG_ENV, VERBOSE_ENV, verbose_env

VERBOSE_FLAG = "--verbose"


def verbose_requested(argv=None) -> bool:
    """Whether the user asked to see TensorFlow's own output (``--verbose`` or ``MSDN_TF_VERBOSE=1``).

    Args:
        argv: the command's arguments (default ``sys.argv[1:]``).

    Example:
        >>> verbose_requested(["--dataset", "demo", "--verbose"])
        True
    """
    argv = sys.argv[1:] if argv is None else argv
    return VERBOSE_FLAG in argv or verbose_env()


@contextlib.contextmanager
def stderr_fd_captured():
    """Send file descriptor 2 to a temporary file for the block; print what it got if the block fails.

    Example:
        >>> with stderr_fd_captured():
        ...     import tensorflow  # its start-up lines go to the temporary file
    """
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                capture.seek(0)
                os.write(2, capture.read())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` with the other finders and runs its import with file descriptor 2 captured.

    It stays in ``sys.meta_path`` (``importlib.util.find_spec("tensorflow")``, as the backend
    check does, must not use it up); once TensorFlow is imported Python no longer asks it.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            with stderr_fd_captured():
                run(module)

        spec.loader.exec_module = exec_module
        return spec


def quiet_tensorflow_startup(argv=None) -> bool:
    """Hide TensorFlow's start-up noise for this process unless verbose output was asked for.

    Must run before TensorFlow is imported (importing :mod:`msdn_tf.cli` calls it).
    An explicit ``TF_CPP_MIN_LOG_LEVEL`` in the environment is kept.

    Args:
        argv: the command's arguments (default ``sys.argv[1:]``), searched for ``--verbose``.

    Returns:
        True if the noise is hidden, False under ``--verbose`` / ``MSDN_TF_VERBOSE=1``.

    Example:
        >>> quiet_tensorflow_startup([])  # then: import tensorflow prints nothing
        True
    """
    if verbose_requested(argv):
        return False
    os.environ.setdefault(TF_LOG_ENV, QUIET_TF_LOG_LEVEL)
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
    return True


def add_common_flags(parser, *, dataset_help: str | None = None, data_dir: bool = True, config: bool = True):
    """Add ``--dataset``, ``--data-dir``, ``--config``, ``--set`` and ``--verbose`` to an argparse parser.

    Args:
        parser: an ``argparse.ArgumentParser``.
        dataset_help: help text of ``--dataset`` (None: no ``--dataset`` flag).
        data_dir: add ``--data-dir``.
        config: add ``--config`` (repeatable) and ``--set`` (repeatable).

    Returns:
        The parser.

    Example:
        >>> import argparse
        >>> args = add_common_flags(argparse.ArgumentParser(), dataset_help="dataset").parse_args(
        ...     ["--set", "train.seed=1"])
        >>> args.set
        ['train.seed=1']
    """
    if dataset_help is not None:
        parser.add_argument("--dataset", help=dataset_help)
    if data_dir:
        parser.add_argument("--data-dir", help="folder with the dataset files (see README)")
    if config:
        parser.add_argument("--config", action="append", default=[], help="extra YAML config file(s) applied in order")
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override one config value, e.g. --set train.iterations=100",
        )
    add_verbose_flag(parser)
    return parser


def config_from_common_flags(args):
    """The resolved config of :func:`add_common_flags`' flags: ``--dataset``'s YAML, the ``--config``
    files, ``--set`` and ``--data-dir``; an unknown dataset fails here, before TensorFlow starts."""
    from msdn_tf.config import resolve_config
    from msdn_tf.data.registry import get_spec

    config = resolve_config(args.dataset, args.config, args.set, flags=[("data.data_dir", args.data_dir, "--data-dir")])
    get_spec(config.data.dataset)
    return config


def add_verbose_flag(parser):
    """Add ``--verbose`` (show TensorFlow's own start-up and log lines) to an argparse parser, once."""
    if VERBOSE_FLAG in parser._option_string_actions:
        return parser
    parser.add_argument(
        VERBOSE_FLAG, action="store_true", help=f"show TensorFlow's start-up and log lines (also: {VERBOSE_ENV}=1)"
    )
    return parser


def add_report_flag(parser):
    """Add a benchmark's ``--json [FILE]``: the full report instead of the short table, or written to FILE.

    :func:`print_report` acts on it.
    """
    parser.add_argument(
        "--json",
        dest="json_out",
        nargs="?",
        const="-",
        metavar="FILE",
        help="print the full JSON report instead of the short table; with FILE, write it there (and print the table)",
    )
    return parser


def print_report(report: dict, json_out, table) -> None:
    """Print a benchmark's report as :func:`add_report_flag` asked: the JSON, or ``table(report)`` (and FILE).

    The file is written atomically (a temporary file, then a rename).
    """
    import json

    from msdn_tf.utils import atomic_write_text

    text = json.dumps(report, indent=1)
    if json_out == "-":
        print(text)
        return
    if json_out:
        atomic_write_text(json_out, text + "\n")
    print(table(report))


CONSOLE_SCRIPT_PREFIX = "msdn-"


def command_prog(command: str, argv0: str | None = None) -> str:
    """The command's name as the user invoked it, for ``usage:`` lines and errors.

    ``msdn-bench-input`` when run as that console script, else ``python -m msdn_tf.bench_input``.

    Args:
        command: the module name in :mod:`msdn_tf.cli` (``train``, ``bench_input``, ...).
        argv0: the program path (default ``sys.argv[0]``).

    Example:
        >>> command_prog("bench_input", "/venv/bin/msdn-bench-input")
        'msdn-bench-input'
        >>> command_prog("train", "/repo/msdn_tf/train.py")
        'python -m msdn_tf.train'
    """
    name = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    if name.startswith(CONSOLE_SCRIPT_PREFIX):
        return name
    return f"python -m msdn_tf.{command}"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default (``(default: 50)``) unless it has none to show.

    No default is shown for a flag whose default is None, False (an on/off switch) or an
    empty list (a repeatable flag): their help text says what happens without them.
    """

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """The argument parser of every msdn-tf command (and its sub-commands).

    Differences from ``argparse.ArgumentParser``: ``command=`` names the command so ``usage:``
    shows it as invoked (:func:`command_prog`); ``--help`` shows defaults
    (:class:`DefaultsHelpFormatter`); ``--verbose`` is listed on every parser, because
    :func:`cli_main` accepts it everywhere. Sub-command parsers are of this class too.

    Args:
        command: the module name in :mod:`msdn_tf.cli` (sets ``prog``); sub-parsers get their
            ``prog`` from argparse.
        **kwargs: as for ``argparse.ArgumentParser``.

    Example:
        >>> p = CommandParser(command="train", description="Train MSDN.")
        >>> p.prog
        'python -m msdn_tf.train'
    """

    def __init__(self, *args, command: str | None = None, **kwargs):
        if command is not None:
            kwargs["prog"] = command_prog(command)
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        if self.add_help:
            add_verbose_flag(self)


def report_error(exc: BaseException) -> int:
    """Print the one-line message of a known error to stderr; the exit status.

    2, or the error's ``exit_code`` (130 for an interruption, as shells report SIGINT).
    """
    if isinstance(exc, OSError):
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
    elif isinstance(exc, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return 130
    else:
        print(f"error: {exc}", file=sys.stderr)
    return int(getattr(exc, "exit_code", 2))


def cli_main(main):
    """Decorate a command's ``main(argv)``: :class:`MSDNError` and ``OSError`` become one line and exit 2.

    Ctrl-C is one line too, with exit status 130 (training says which checkpoint is intact).

    Every command uses this one tail, so a disk full, a read-only folder or a bad input
    reads the same everywhere: ``error: <path>: <what> ...`` on stderr, no traceback.
    ``--verbose`` is taken out of the arguments (it acted at start-up, see
    :func:`quiet_tensorflow_startup`), so every command accepts it.

    Example:
        >>> @cli_main
        ... def main(argv=None) -> int:
        ...     ...
    """

    @functools.wraps(main)
    def wrapper(argv=None):
        argv = list(sys.argv[1:] if argv is None else argv)
        if VERBOSE_FLAG in argv:
            argv = [a for a in argv if a != VERBOSE_FLAG]
        try:
            return main(argv)
        except (MSDNError, OSError, KeyboardInterrupt) as exc:
            return report_error(exc)

    return wrapper
