"""Evaluation library: zero-shot metrics, calibration and running a model over the test splits.

* :mod:`msdn_tf.evaluation.metrics`: per-class accuracy, CZSL/GZSL predictions, H (NumPy only);
* :mod:`msdn_tf.evaluation.calibration`: the seen/unseen curve, AUSUC and choosing gamma;
* :mod:`msdn_tf.evaluation.predict`: :func:`~msdn_tf.evaluation.predict.evaluate_model` and
  :func:`~msdn_tf.evaluation.predict.predict_logits` (a Keras model over a dataset's splits).

The command is ``python -m msdn_tf.evaluate``. Importing this package imports nothing else.
"""
