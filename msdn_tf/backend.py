"""Which Keras backend msdn-tf runs on, checked before Keras is imported.

Keras 3 picks its backend once, at import: ``KERAS_BACKEND`` if set, else the
``backend`` entry of ``$KERAS_HOME/keras.json`` (default ``~/.keras/keras.json``),
else ``tensorflow``. msdn-tf trains and evaluates on ``tensorflow`` (the default;
``tf.distribute``, on-device batches, SavedModel export) and on ``jax`` (the
model, the training step of :mod:`msdn_tf.training_jax`, the benchmark). An
unknown or uninstalled backend would otherwise fail deep inside Keras' import;
:func:`check_backend` (run when ``msdn_tf`` is imported) names the setting and the
install command instead. It imports nothing heavy: only ``importlib`` looks for
the backend's package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from msdn_tf.errors import MSDNError

# backend -> (package Keras imports for it, how to install it)
SUPPORTED = {
    "tensorflow": ("tensorflow", "pip install 'tensorflow==2.21.0' (or pip install -e . in a checkout)"),
    "jax": ("jax", "pip install 'msdn-tf[jax]' (JAX's CPU build; on an NVIDIA GPU: pip install -U 'jax[cuda12]')"),
}


class BackendError(MSDNError, ImportError):
    """The Keras backend selected is unknown to msdn-tf or not installed."""


def requested_backend() -> tuple:
    """``(name, where the choice came from)``, resolved the way Keras resolves it.

    If Keras is already imported, its backend is the answer.
    """
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return keras.backend.backend(), "keras (already imported)"
    env = os.environ.get("KERAS_BACKEND")
    if env:
        return env, f"KERAS_BACKEND={env}"
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = os.path.join(home, "keras.json")
    try:
        with open(path) as f:
            name = json.load(f).get("backend")
        if name:
            return name, f"the 'backend' entry of {path} (KERAS_BACKEND is not set)"
    except (OSError, ValueError, AttributeError):
        pass
    return "tensorflow", "Keras' default (KERAS_BACKEND is not set)"


def check_backend() -> str:
    """The Keras backend name, after checking that msdn-tf supports it and that it is installed.

    Raises:
        BackendError: the backend is not ``tensorflow`` or ``jax``, or its package
            is not installed; the message names ``KERAS_BACKEND`` and the install command.
    """
    name, source = requested_backend()
    if name not in SUPPORTED:
        raise BackendError(
            f"{source}: msdn-tf runs on the Keras backends {' and '.join(SUPPORTED)}, not {name!r}; "
            "set KERAS_BACKEND=tensorflow (the default) or KERAS_BACKEND=jax"
        )
    package, install = SUPPORTED[name]
    if importlib.util.find_spec(package) is None:
        other = "jax" if name == "tensorflow" else "tensorflow"
        raise BackendError(
            f"{source} selects the Keras backend {name!r}, but the package {package!r} is not installed. "
            f"Install it: {install}; or choose the other backend with KERAS_BACKEND={other}"
        )
    return name


def current() -> str:
    """The backend Keras runs on (imports Keras, not TensorFlow)."""
    import keras

    return keras.backend.backend()


def on_tensorflow() -> bool:
    """True when Keras runs on TensorFlow."""
    return current() == "tensorflow"


def on_jax() -> bool:
    """True when Keras runs on JAX."""
    return current() == "jax"
