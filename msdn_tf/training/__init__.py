"""Training library (the command is ``python -m msdn_tf.train``).

* :mod:`msdn_tf.training.loop`: :func:`~msdn_tf.training.loop.run_training` and its steps
  (run-directory checks, the strategy, the model from the config, the training session);
* :mod:`msdn_tf.training.checkpoint`: step-stamped checkpoints committed by ``state.json``;
* :mod:`msdn_tf.training.reporting`: ``results.json`` / ``results.md``, the summary line,
  TensorBoard scalars and the purge of events past a resumed checkpoint;
* :mod:`msdn_tf.training.nonfinite`: stop at the first NaN/inf and say where it came from;
* :mod:`msdn_tf.training.multi_worker`: the step loop under MultiWorkerMirroredStrategy;
* :mod:`msdn_tf.training.jax_loop`: on JAX, the trainval rows on the device and a whole
  evaluation period per dispatch (``lax.fori_loop`` over ``training_jax.train_step``);
* :mod:`msdn_tf.training.resume`: which flags ``--resume`` may change;
* :mod:`msdn_tf.training.convert`: a released PyTorch checkpoint -> a run directory (the command is
  ``python -m msdn_tf.convert``).

``distribute.py``, ``precision.py`` and ``training_jax.py`` stay top level: the model
(core) imports ``distribute`` and ``training_jax``, and the benchmark library
(:mod:`msdn_tf.perf.model_speed`) uses ``precision``; a core module never imports this
package. Importing this package imports nothing else.
"""
