"""Interoperability with the PyTorch reference implementation.

* :mod:`msdn_tf.interop.torch_checkpoint`: a torch-free, restricted reader of ``torch.save``
  state_dicts and the reference key table.

Importing this package imports nothing else (no TensorFlow, no torch).
"""
