"""msdn-tf: MSDN (Mutually Semantic Distillation Network) for zero-shot learning, in Keras 3."""

__version__ = "0.1.0"

_LAZY = {
    "MSDN": "msdn_tf.model",
    "build_msdn": "msdn_tf.model",
    "TorchRMSprop": "msdn_tf.optimizers",
}


def _check_backend():
    # Before anything imports Keras: an unknown or uninstalled KERAS_BACKEND gets a message
    # that says what to set or install (msdn_tf.backend), not an error from deep inside Keras.
    import sys

    from msdn_tf.backend import BackendError, check_backend

    try:
        check_backend()
    except BackendError as exc:
        if sys.argv[:1] == ["-m"]:  # `python -m msdn_tf.<command>`: a message and exit status 2, no traceback
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        raise


_check_backend()


def __getattr__(name):
    # Lazy so that tools which only read files (checkpoint conversion, readers) need not import TensorFlow.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msdn_tf' has no attribute {name!r}")
