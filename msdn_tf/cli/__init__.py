"""The command wing: one module per command, each an argparse parser and one library call.

``python -m msdn_tf.<name>`` (a three-line module at the package root) and the console
script ``msdn-<name>`` both land here. Importing this package is what makes a process a
command run: it hides TensorFlow's C++ start-up lines (unless ``--verbose`` or
``MSDN_TF_VERBOSE=1``) and checks ``KERAS_BACKEND`` before anything imports Keras
(:mod:`msdn_tf.cli.common`). Libraries never import this package.
"""

from __future__ import annotations

import importlib
import sys

from msdn_tf.cli.common import quiet_tensorflow_startup

quiet_tensorflow_startup()


def _check_backend() -> None:
    from msdn_tf.backend import BackendError, check_backend

    try:
        check_backend()
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


_check_backend()


def run(name: str) -> None:
    """Run the command module ``msdn_tf.cli.<name>`` with ``sys.argv[1:]`` and exit with its status.

    Args:
        name: the command's module name in this package (``train``, ``export``, ...).

    Example:
        >>> run("train")  # what ``python -m msdn_tf.train`` does
    """
    module = importlib.import_module(f"msdn_tf.cli.{name}")
    raise SystemExit(module.main())
