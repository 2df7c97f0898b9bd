"""Experiments built from the library: whole workflows rather than single steps.

* :mod:`msdn_tf.experiments.custom_workflow`: your own images end to end (prepare, train,
  evaluate, export, serve); the command is ``python -m msdn_tf.custom``;
* :mod:`msdn_tf.experiments.protocols`: model-selection protocols (reference, final,
  validation) over seeds; the command is ``python -m msdn_tf.protocols``;
* :mod:`msdn_tf.experiments.ablations`: the rows of the paper's Table 2; the command is
  ``python -m msdn_tf.ablations``.

Importing this package imports nothing else.
"""
