"""An in-memory (on-device) training pipeline: features held by TensorFlow, batches gathered in the graph.

The host pipeline (:func:`msdn_tf.data.pipeline.train_dataset`) calls Python
(``tf.numpy_function``) every step to read a batch. When the training rows fit a
memory budget, :class:`DeviceFeatures` copies them ONCE into a ``tf.Variable``
(on the accelerator if there is one; ``float16`` storage optional) and
:func:`device_train_dataset` draws the same batches as the host pipeline (the
sampler's rows for each step, computed for the whole period up front) with a
``tf.gather`` inside the tf.data graph: no host round-trip per step.

Selected by ``data.on_device``: ``true``, ``false`` or ``"auto"`` (use it when the
rows fit :func:`memory_budget_bytes`).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from msdn_tf.errors import ConfigError
from msdn_tf.options import ON_DEVICE

DEFAULT_BUDGET_BYTES = 8 * 1024**3  # upper bound of the "auto" budget
CHUNK_ROWS = 256  # rows copied per assignment while loading


def _available_memory_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget_bytes() -> int:
    """The ``"auto"`` budget: the smaller of 8 GiB and half the available memory.

    The environment variable ``MSDN_ON_DEVICE_BUDGET_MB`` overrides it.
    """
    env = os.environ.get("MSDN_ON_DEVICE_BUDGET_MB")
    if env:
        return int(float(env) * 1024**2)
    available = _available_memory_bytes()
    return DEFAULT_BUDGET_BYTES if available is None else min(DEFAULT_BUDGET_BYTES, available // 2)


def storage_dtype(features) -> np.dtype:
    """The dtype rows are kept in: the source's own (``float16`` for a float16 cache), else ``float32``."""
    dtype = np.dtype(getattr(features, "dtype", np.float32))
    return dtype if dtype in (np.float16, np.float32) else np.dtype(np.float32)


def use_on_device(setting, data, rows=None) -> bool:
    """Whether ``data.on_device = setting`` selects the in-memory pipeline for ``rows`` (default trainval).

    Raises:
        ConfigError: ``setting`` is not ``true``, ``false`` or ``"auto"``.
    """
    if setting not in ON_DEVICE or isinstance(setting, (int, float)) and not isinstance(setting, bool):
        raise ConfigError(f"'data.on_device' must be true, false or auto; got {setting!r}")
    if setting is True or setting is False:
        return setting
    rows = data.trainval_loc if rows is None else rows
    size = len(np.unique(rows)) * data.num_regions * data.feature_dim * storage_dtype(data.features).itemsize
    return size <= memory_budget_bytes()


class DeviceFeatures:
    """Rows of a :class:`~msdn_tf.data.base.FeatureSource` held in a non-trainable ``tf.Variable``.

    Args:
        features: the source (``read`` or ``read_native``).
        rows: the row ids to hold (e.g. trainval); others cannot be gathered.
        dtype: storage dtype, default :func:`storage_dtype` of the source
            (``"float16"`` halves the memory; batches come out as float32).

    Loading copies ``CHUNK_ROWS`` rows at a time, so the peak is the variable plus
    one chunk, not two copies of the data. Create it OUTSIDE a
    ``tf.distribute`` scope (a mirrored variable would copy it per replica).
    """

    def __init__(self, features, rows, dtype=None):
        import tensorflow as tf

        rows = np.unique(np.asarray(rows, dtype=np.int64))
        self.rows = rows
        self.dtype = np.dtype(dtype) if dtype is not None else storage_dtype(features)
        _, R, F = features.shape
        read = getattr(features, "read_native", None) or features.read
        self.position = np.full((int(features.shape[0]),), -1, dtype=np.int64)  # global row -> position
        self.position[rows] = np.arange(rows.size)
        self.values = tf.Variable(
            tf.zeros((rows.size, R, F), dtype=self.dtype.name), trainable=False, name="device_features"
        )
        for start in range(0, rows.size, CHUNK_ROWS):
            chunk = np.asarray(read(rows[start : start + CHUNK_ROWS])).astype(self.dtype, copy=False)
            self.values[start : start + chunk.shape[0]].assign(chunk)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.values.shape)) * self.dtype.itemsize

    def positions(self, rows) -> np.ndarray:
        """Positions in :attr:`values` of global ``rows`` (all must be held)."""
        pos = self.position[np.asarray(rows, dtype=np.int64)]
        if np.any(pos < 0):
            raise ValueError("rows not held on the device were requested")
        return pos

    def gather(self, positions):
        """``(len(positions), R, F)`` float32 rows, inside the graph."""
        import tensorflow as tf

        return tf.cast(tf.gather(self.values, positions), tf.float32)


def batch_table(positions, labels, sampler, start_step: int, num_steps: int, shard=None) -> tuple:
    """``(positions, labels)``, both ``(num, B)`` int64: the sampler's batches of steps ``[start, start + num)``.

    The rows of each step's batch (:func:`~msdn_tf.data.pipeline.shard_of_batch` of it
    with ``shard=(parts, count)``), mapped to positions in a held array by
    ``positions(rows)``. The host pipeline, the TensorFlow on-device pipeline and the
    JAX loop (:mod:`msdn_tf.training.jax_loop`) all draw their batches from here or
    from the same ``sampler.batch(step)``, so they see the same batches.
    """
    from msdn_tf.data.pipeline import shard_of_batch

    steps = range(int(start_step), int(start_step) + int(num_steps))
    parts, count = ([0], 1) if shard is None else (list(shard[0]), int(shard[1]))
    batches = [shard_of_batch(sampler.batch(s), p, count) for s in steps for p in parts]
    table = np.stack([positions(b) for b in batches]).astype(np.int64)  # (num, B)
    batch_labels = np.stack([np.asarray(labels)[b] for b in batches]).astype(np.int64)  # (num, B)
    return table, batch_labels


def device_train_dataset(
    store: DeviceFeatures, labels, sampler, start_step: int, num_steps: int, prefetch: int = 2, shard=None
):
    """The batches of :func:`~msdn_tf.data.pipeline.train_dataset`, gathered from ``store`` in the graph.

    The sampler's rows for steps ``[start, start + num)`` are computed up front (a
    ``(num, B)`` index table, a few kB); each element then is a gather from the
    held features and labels: ``(features (B, R, F) float32, labels (B,) int64)``.
    ``shard=(parts, count)``: this worker's slices of each global batch, as in
    :func:`~msdn_tf.data.pipeline.train_dataset`.
    """
    import tensorflow as tf

    table, batch_labels = batch_table(store.positions, labels, sampler, start_step, num_steps, shard)

    def load(positions, y):
        x = store.gather(positions)
        x.set_shape([positions.shape[0]] + list(store.values.shape[1:]))
        return x, y

    ds = tf.data.Dataset.from_tensor_slices((table, batch_labels))
    return ds.map(load, num_parallel_calls=1, deterministic=True).prefetch(prefetch)
