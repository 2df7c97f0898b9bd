"""Training under ``tf.distribute``: strategy selection and the cross-replica pieces of the loss.

``train.strategy`` (or ``--strategy``) selects:

* ``none``: the default (single-device) strategy;
* ``mirrored``: :class:`tf.distribute.MirroredStrategy` over every local GPU, or
  over every logical CPU device when there is no GPU (see
  :func:`split_cpu_devices`);
* ``multi_worker``: :class:`tf.distribute.MultiWorkerMirroredStrategy`; the
  cluster comes from the ``TF_CONFIG`` environment variable, which every worker
  sets before starting (``{"cluster": {"worker": ["host1:port", ...]}, "task":
  {"type": "worker", "index": i}}``).

The model and its optimizer are built inside ``strategy.scope()``; Keras' ``fit``
splits each global batch over the replicas. Gradients are SUMMED over replicas
by the optimizer (Keras 3 all-reduces them in ``optimizer.apply``), so each
replica's loss is weighted by its share of the global batch
(:func:`local_batch_weight`): the sum of the weighted per-replica batch means is
the global-batch mean. The reference self-calibration is not a mean of
per-sample terms but ``-log`` of the batch-mean unseen mass; under several
replicas that mass is all-reduced (:func:`cross_replica_log_mean_exp`), so the
loss and its gradient are those of the global batch.
"""

from __future__ import annotations

import json
import os

STRATEGIES = ("none", "mirrored", "multi_worker")


def split_cpu_devices(n: int) -> None:
    """Split the physical CPU into ``n`` logical devices (for MirroredStrategy on a CPU).

    Must run before TensorFlow initialises its devices (before the first op).
    """
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * int(n))


def get_strategy(name: str = "none"):
    """The ``tf.distribute`` strategy named in the config.

    Args:
        name: ``none``, ``mirrored`` or ``multi_worker``.

    Returns:
        A :class:`tf.distribute.Strategy` (the default strategy for ``none``).
    """
    import tensorflow as tf

    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        if not devices:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(devices) == 1:
            return tf.distribute.MirroredStrategy(devices=devices)
        cross_device = None
        if not tf.config.list_logical_devices("GPU"):
            # NCCL is for GPUs; on CPU devices reduce in host memory.
            cross_device = tf.distribute.ReductionToOneDevice(reduce_to_device=devices[0])
        return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross_device)
    if name == "multi_worker":
        if "TF_CONFIG" in os.environ:
            json.loads(os.environ["TF_CONFIG"])  # fail early on malformed JSON
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")


def _replica_context():
    """The current replica context if it has more than one replica in sync, else ``None``.

    ``None`` on a backend other than TensorFlow (``tf.distribute`` is TensorFlow's;
    TensorFlow is not imported there).
    """
    from msdn_tf.backend import on_tensorflow

    if not on_tensorflow():
        return None
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


def num_replicas() -> int:
    """Replicas in sync in the current replica context (1 outside any strategy)."""
    ctx = _replica_context()
    return 1 if ctx is None else int(ctx.num_replicas_in_sync)


def local_batch_weight(local_batch, dtype="float32"):
    """This replica's share ``n_local / N_global`` of the global batch (1 with one replica).

    Multiplying each replica's batch-mean loss by it makes the SUM of the
    replicas' gradients (what the optimizer applies) the gradient of the
    global-batch mean, also when the last replica gets a smaller slice.
    """
    import tensorflow as tf

    ctx = _replica_context()
    n = tf.cast(local_batch, dtype)
    if ctx is None:
        return tf.ones((), dtype)
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, n)
    return n / total


def cross_replica_log_mean_exp(log_values):
    """``log(mean over the GLOBAL batch of exp(log_values))``, differentiable, from ``(B_local,)``.

    Stable: values are shifted by the cross-replica maximum (a constant for the
    gradient) before the sums are all-reduced. With one replica it is
    ``logsumexp(x) - log(B)``.
    """
    import tensorflow as tf

    ctx = _replica_context()
    if ctx is None:
        n = tf.cast(tf.shape(log_values)[0], log_values.dtype)
        return tf.reduce_logsumexp(log_values) - tf.math.log(n)
    local_max = tf.reshape(tf.stop_gradient(tf.reduce_max(log_values)), [1])
    shift = tf.stop_gradient(tf.reduce_max(ctx.all_gather(local_max, axis=0)))  # ReduceOp has no MAX
    local = tf.stack([tf.reduce_sum(tf.exp(log_values - shift)),
                      tf.cast(tf.shape(log_values)[0], log_values.dtype)])
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local)  # gradient: all-reduced too
    return shift + tf.math.log(total[0]) - tf.math.log(total[1])
