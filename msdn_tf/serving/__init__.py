"""Serving infrastructure for msdn-tf exports (TensorFlow Serving).

* :mod:`msdn_tf.serving.cc_loader` -- check an export with TensorFlow's C++
  SavedModel loader, the loader TF Serving uses.
* :mod:`msdn_tf.serving.local_server` -- a local gRPC/REST PredictionService that
  is a TEST DOUBLE of TF Serving (not TF Serving itself).
* :mod:`msdn_tf.serving.client_lib` -- build PredictRequests and call a server
  over gRPC or REST.
* :mod:`msdn_tf.serving.export` -- write an export (SavedModel + metadata), publish it atomically;
* :mod:`msdn_tf.serving.verify` -- check an export against the Keras model before publishing;
* :mod:`msdn_tf.serving.classify` -- classify features/images with a served export (class names,
  top-k), on top of :mod:`~msdn_tf.serving.client_lib`;
* :mod:`msdn_tf.serving.bench` -- command: CPU latency/throughput of an exported SavedModel
  (library :mod:`msdn_tf.perf.serving_latency`).

The commands are :mod:`msdn_tf.cli.export` and :mod:`msdn_tf.cli.client`; ``export/README.md`` shows the whole path.

Importing this package does not import TensorFlow; the submodules import it
when they need it.
"""
