"""Training under ``tf.distribute``: strategy selection and the cross-replica pieces of the loss.

``train.strategy`` (or ``--strategy``) selects:

* ``none``: the default (single-device) strategy;
* ``mirrored``: :class:`tf.distribute.MirroredStrategy` over every local GPU, or
  over every logical CPU device when there is no GPU (see
  :func:`split_cpu_devices`);
* ``multi_worker``: :class:`tf.distribute.MultiWorkerMirroredStrategy`; the
  cluster comes from the ``TF_CONFIG`` environment variable, which every worker
  sets before starting (``{"cluster": {"worker": ["host1:port", ...]}, "task":
  {"type": "worker", "index": i}}``). :func:`parse_tf_config` checks it first;
  ``train.worker_timeout`` bounds the wait for the cluster and every all-reduce.
  Each worker trains on its slice of every global batch and only the chief
  writes the run (``msdn_tf.training.loop``; docs/distributed.md).

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

import dataclasses
import json
import os
from typing import Optional

from msdn_tf.errors import ConfigError
from msdn_tf.options import STRATEGIES


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """This process's place in a ``TF_CONFIG`` cluster.

    Attributes:
        jobs: ``{"chief": [...], "worker": [...]}`` addresses (``host:port``).
        task_type: ``chief`` or ``worker``.
        index: this task's index in its job.
        is_chief: the task that writes the run's outputs (``chief`` 0, else ``worker`` 0).
        rank: position among all tasks (chief first), which is also this worker's
            input shard.
        num_workers: tasks in the cluster.
    """

    jobs: dict
    task_type: str
    index: int
    is_chief: bool
    rank: int
    num_workers: int

    @property
    def address(self) -> str:
        return self.jobs[self.task_type][self.index]


def parse_tf_config(text: Optional[str]) -> ClusterInfo:
    """Check a ``TF_CONFIG`` value and say where this process is in the cluster.

    Args:
        text: the JSON text, or ``None`` (no ``TF_CONFIG``: a cluster of one worker).

    Raises:
        ConfigError: naming the ``TF_CONFIG`` key that is wrong (malformed JSON, no
            ``cluster.worker``, a bad address, ``task.index`` out of range, ...).

    Example:
        >>> parse_tf_config('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}').rank
        1
    """
    if text is None:
        return ClusterInfo({"worker": ["localhost:0"]}, "worker", 0, True, 0, 1)
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({exc})") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        raise ConfigError(
            'TF_CONFIG needs a "cluster" mapping, e.g. {"cluster": {"worker": ["host1:port", '
            '"host2:port"]}, "task": {"type": "worker", "index": 0}}'
        )
    cluster = spec["cluster"]
    unknown = sorted(set(cluster) - {"chief", "worker"})
    if unknown:
        raise ConfigError(f"TF_CONFIG cluster.{unknown[0]}: only 'chief' and 'worker' jobs are supported")
    jobs, seen = {}, set()
    for job in ("chief", "worker"):
        if job not in cluster:
            continue
        addresses = cluster[job]
        if not isinstance(addresses, list) or not addresses:
            raise ConfigError(f"TF_CONFIG cluster.{job} must be a non-empty list of 'host:port' addresses")
        if job == "chief" and len(addresses) != 1:
            raise ConfigError(f"TF_CONFIG cluster.chief must hold exactly one address, got {len(addresses)}")
        for i, address in enumerate(addresses):
            host, _, port = str(address).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"TF_CONFIG cluster.{job}[{i}] = {address!r}: expected 'host:port'")
            if address in seen:
                raise ConfigError(f"TF_CONFIG cluster.{job}[{i}] = {address!r} appears twice")
            seen.add(address)
        jobs[job] = [str(a) for a in addresses]
    if "worker" not in jobs and "chief" not in jobs:
        raise ConfigError("TF_CONFIG cluster has no 'worker' (or 'chief') addresses")
    task = spec.get("task")
    if not isinstance(task, dict):
        raise ConfigError('TF_CONFIG needs a "task" mapping, e.g. {"type": "worker", "index": 0}')
    task_type = task.get("type")
    if task_type not in jobs:
        raise ConfigError(f"TF_CONFIG task.type = {task_type!r}: expected one of the cluster's jobs {sorted(jobs)}")
    index = task.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool):
        raise ConfigError(f"TF_CONFIG task.index = {index!r}: expected an integer")
    if not 0 <= index < len(jobs[task_type]):
        raise ConfigError(
            f"TF_CONFIG task.index = {index} is out of range: cluster.{task_type} has "
            f"{len(jobs[task_type])} address(es), so the index must lie in 0..{len(jobs[task_type]) - 1}"
        )
    has_chief = "chief" in jobs
    is_chief = task_type == "chief" or (not has_chief and index == 0)
    rank = index if task_type == "chief" else index + (1 if has_chief else 0)
    return ClusterInfo(jobs, task_type, index, is_chief, rank, sum(len(v) for v in jobs.values()))


def cluster_info(strategy_name: str) -> ClusterInfo:
    """This process's :class:`ClusterInfo` (a cluster of one unless ``multi_worker``)."""
    if strategy_name != "multi_worker":
        return parse_tf_config(None)
    return parse_tf_config(os.environ.get("TF_CONFIG"))


_WATCHDOG = """
import os, signal, sys, time
parent, deadline, message = int(sys.argv[1]), time.time() + float(sys.argv[2]), sys.argv[3]
while time.time() < deadline:
    time.sleep(0.2)
    if os.getppid() != parent:
        sys.exit(0)
sys.stderr.write("error: " + message + "\\n")
sys.stderr.flush()
os.kill(parent, signal.SIGTERM)
time.sleep(2)
if os.getppid() == parent:
    os.kill(parent, signal.SIGKILL)  # TensorFlow's gRPC layer may hold SIGTERM back
"""


def _exit_after(seconds: float, message: str):
    """A watchdog process that prints ``error: message`` and ends this process after ``seconds``.

    It sends SIGTERM, then SIGKILL 2 s later (the exit status is then 137).

    TensorFlow waits for the workers of a cluster in C++, holding Python's global
    lock and without a deadline, so neither an exception nor a Python thread can
    end that wait; a separate process can. ``.terminate()`` the returned process
    to cancel it.
    """
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message])


def split_cpu_devices(n: int) -> None:
    """Split the physical CPU into ``n`` logical devices (for MirroredStrategy on a CPU).

    Must run before TensorFlow initialises its devices (before the first op).
    """
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * int(n))


def get_strategy(name: str = "none", timeout_s: float = 120.0):
    """The ``tf.distribute`` strategy named in the config.

    Args:
        name: ``none``, ``mirrored`` or ``multi_worker``.
        timeout_s: ``multi_worker`` only (``train.worker_timeout``): seconds to wait
            for every worker of ``TF_CONFIG`` to connect (else the process ends with
            status 2 and a message naming TF_CONFIG), and the deadline of every
            collective operation (a worker that stops later is noticed within it).

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
        info = cluster_info(name)  # a clear error on a malformed or inconsistent TF_CONFIG
        if "TF_CONFIG" not in os.environ:
            return tf.distribute.MultiWorkerMirroredStrategy()  # a cluster of one
        others = [
            f"{job}[{i}] {a}"
            for job, addrs in info.jobs.items()
            for i, a in enumerate(addrs)
            if (job, i) != (info.task_type, info.index)
        ]
        message = (
            f"TF_CONFIG: this {info.task_type} ({info.task_type}[{info.index}] {info.address}) did not "
            f"reach every other worker ({', '.join(others)}) within train.worker_timeout = {timeout_s:g} s; "
            "start every worker with its own task.index, and check the addresses and ports"
        )
        watchdog = _exit_after(timeout_s, message)
        try:
            options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=float(timeout_s))
            strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
            # A first collective: every worker is up and reachable.
            strategy.reduce("SUM", strategy.run(lambda: tf.ones(())), axis=None)
        except (tf.errors.OpError, RuntimeError) as exc:
            raise ConfigError(f"{message}. TensorFlow said: {str(exc).splitlines()[0][:300]}") from exc
        finally:
            watchdog.terminate()
            watchdog.wait()
        return strategy
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
    local = tf.stack([tf.reduce_sum(tf.exp(log_values - shift)), tf.cast(tf.shape(log_values)[0], log_values.dtype)])
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local)  # gradient: all-reduced too
    return shift + tf.math.log(total[0]) - tf.math.log(total[1])
