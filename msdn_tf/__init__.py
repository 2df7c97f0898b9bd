"""msdn-tf: MSDN (Mutually Semantic Distillation Network) for zero-shot learning, in Keras 3.

``import msdn_tf`` is light and the same for every importer: it imports neither Keras nor
TensorFlow. ``msdn_tf.MSDN``, ``msdn_tf.build_msdn`` and ``msdn_tf.TorchRMSprop`` import
their modules on first use. :func:`load_model` opens every ``.keras`` file msdn-tf writes;
``keras.saving.load_model`` does too once :mod:`msdn_tf.model` and :mod:`msdn_tf.optimizers`
are imported (that registers the Keras objects). The commands are in :mod:`msdn_tf.cli`.
"""

__version__ = "0.1.0"

_LAZY = {
    "MSDN": "msdn_tf.model",
    "build_msdn": "msdn_tf.model",
    "TorchRMSprop": "msdn_tf.optimizers",
}


def load_model(path, **kwargs):
    """``keras.saving.load_model`` with msdn-tf's Keras objects registered.

    Args:
        path: a ``.keras`` file written by msdn-tf (a run's ``model.keras``).
        **kwargs: passed to ``keras.saving.load_model`` (e.g. ``compile=False``).

    Example:
        >>> import msdn_tf
        >>> model = msdn_tf.load_model("runs/demo/model.keras")
    """
    import keras

    import msdn_tf.model  # noqa: F401  (registers MSDN and its layers)
    import msdn_tf.optimizers  # noqa: F401  (registers TorchRMSprop)
    from msdn_tf.limits import check_keras_archive

    check_keras_archive(path)  # the weight shapes its config declares, before Keras allocates them
    return keras.saving.load_model(path, **kwargs)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msdn_tf' has no attribute {name!r}")
