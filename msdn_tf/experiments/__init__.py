"""Experiments built from the library: whole workflows rather than single steps.

* :mod:`msdn_tf.experiments.custom_workflow`: your own images end to end (prepare, train,
  evaluate, export, serve); the command is ``python -m msdn_tf.custom``.

Importing this package imports nothing else.
"""
