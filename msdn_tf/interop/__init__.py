"""Interoperability with the PyTorch reference implementation.

:mod:`msdn_tf.interop.torch_checkpoint`: a torch-free, restricted reader of ``torch.save``
state_dicts and the reference key table. The backbones read torchvision weights with it and
:mod:`msdn_tf.training.convert` turns a released checkpoint into a run directory (the command
is ``python -m msdn_tf.convert``).

Importing this package imports nothing else (no TensorFlow, no torch).
"""
