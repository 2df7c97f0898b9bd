"""msdn-tf: MSDN (Mutually Semantic Distillation Network) for zero-shot learning, in Keras 3."""

__version__ = "0.1.0"

_LAZY = {
    "MSDN": "msdn_tf.model",
    "build_msdn": "msdn_tf.model",
    "TorchRMSprop": "msdn_tf.optimizers",
}


def __getattr__(name):
    # Lazy so that tools which only read files (checkpoint conversion, readers) need not import TensorFlow.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msdn_tf' has no attribute {name!r}")
