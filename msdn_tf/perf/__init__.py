"""Performance measurements (libraries of the benchmark commands).

* :mod:`msdn_tf.perf.input_pipeline`: the tf.data input pipeline on a benchmark-sized
  feature cache (command ``python -m msdn_tf.bench_input``);
* :mod:`msdn_tf.perf.serving_latency`: latency/throughput of an exported SavedModel
  (command ``python -m msdn_tf.bench_serving``).

* :mod:`msdn_tf.perf.model_speed`: training and evaluation steps against this machine's
  matmul rate, the FLOP count (command ``python -m msdn_tf.bench``).

Importing this package imports nothing else.
"""
