"""msdn-tf: MSDN (Mutually Semantic Distillation Network) for zero-shot learning, in Keras 3."""

__version__ = "0.1.0"

from msdn_tf._cli import is_command_run as _cli_is_command_run

# The modules whose import registers msdn-tf's Keras objects (MSDN, the layers, TorchRMSprop).
_KERAS_MODULES = ("msdn_tf.layers", "msdn_tf.optimizers", "msdn_tf.model")

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


def _quiet_command_startup():
    # A command (`python -m msdn_tf.<command>` or a console script) hides TensorFlow's C++
    # start-up lines unless --verbose / MSDN_TF_VERBOSE=1; this must happen before anything
    # imports TensorFlow, which is why it is here (msdn_tf._cli.quiet_tensorflow_startup).
    from msdn_tf._cli import quiet_tensorflow_startup

    if _cli_is_command_run():
        quiet_tensorflow_startup()


def _register_keras_objects():
    # `keras.saving.load_model` finds MSDN, its layers and TorchRMSprop only once they are
    # registered, which importing their (Keras-only, backend-neutral) modules does: after a
    # plain `import msdn_tf`, every .keras file msdn-tf writes loads. Under KERAS_BACKEND=jax
    # these modules import no TensorFlow. A command (python -m msdn_tf.X) skips this: it imports
    # what it needs itself, so that commands which only read files start without Keras.
    import importlib

    for module in _KERAS_MODULES:
        importlib.import_module(module)


_quiet_command_startup()
_check_backend()


if not _cli_is_command_run():
    _register_keras_objects()


def __getattr__(name):
    # Lazy so that tools which only read files (checkpoint conversion, readers) need not import TensorFlow.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msdn_tf' has no attribute {name!r}")
