"""Performance measurements (libraries of the benchmark commands).

* :mod:`msdn_tf.perf.input_pipeline`: the tf.data input pipeline on a benchmark-sized
  feature cache (command ``python -m msdn_tf.data.bench``);
* :mod:`msdn_tf.perf.serving_latency`: latency/throughput of an exported SavedModel
  (command ``python -m msdn_tf.serving.bench``).

The model-speed benchmark is still the command module :mod:`msdn_tf.bench` (its library part
moves here in wave 2). Importing this package imports nothing else.
"""
