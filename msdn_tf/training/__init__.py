"""Training library.

* :mod:`msdn_tf.training.runs`: load a run directory (its resolved config and model).

The command is ``python -m msdn_tf.train``. Importing this package imports nothing else.
"""
