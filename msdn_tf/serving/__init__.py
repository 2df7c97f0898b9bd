"""Serving infrastructure for msdn-tf exports (TensorFlow Serving).

* :mod:`msdn_tf.serving.cc_loader` -- check an export with TensorFlow's C++
  SavedModel loader, the loader TF Serving uses.
* :mod:`msdn_tf.serving.local_server` -- a local gRPC/REST PredictionService that
  is a TEST DOUBLE of TF Serving (not TF Serving itself).
* :mod:`msdn_tf.serving.client_lib` -- build PredictRequests and call a server
  over gRPC or REST.
* :mod:`msdn_tf.serving.bench` -- CPU latency/throughput of an exported SavedModel.

The export itself is :mod:`msdn_tf.export`; the user-facing client is
:mod:`msdn_tf.client`; ``export/README.md`` shows the whole path.

Importing this package does not import TensorFlow; the submodules import it
when they need it.
"""
