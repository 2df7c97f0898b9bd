"""Evaluation library: zero-shot metrics, calibration and running a model over the test splits.

* :mod:`msdn_tf.evaluation.metrics`: per-class accuracy, CZSL/GZSL predictions, H (NumPy only);
* :mod:`msdn_tf.evaluation.calibration`: the seen/unseen curve, AUSUC and choosing gamma;
* :mod:`msdn_tf.evaluation.predict`: :func:`~msdn_tf.evaluation.predict.evaluate_model` and
  :func:`~msdn_tf.evaluation.predict.predict_logits` (a Keras model over a dataset's splits);
* :mod:`msdn_tf.evaluation.report`: the evaluation report of a run directory;
* :mod:`msdn_tf.evaluation.runs`: load a run directory (its resolved config and model), for
  evaluation, export, figures and the workflows.

The command is ``python -m msdn_tf.evaluate``. Importing this package imports nothing else.
"""
