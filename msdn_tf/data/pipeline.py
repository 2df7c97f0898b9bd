"""Batch samplers (docs/reference.md §6) and the tf.data input pipelines.

Samplers are stateless: the batch of step ``s`` is a function of ``(seed, s)``
only, so a resumed run draws exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from msdn_tf.data.base import ZSLData


class Sampler(Protocol):
    """What the training loop needs of a sampler: the rows of the batch of ``step`` (a pure function)."""

    batch_size: int

    def batch(self, step: int) -> np.ndarray:  # pragma: no cover - protocol
        ...


class RandomBatchSampler:
    """Uniform random batches: ``batch_size`` distinct images drawn from the pool (reference CUB).

    Args:
        indices: pool of row indices (trainval).
        batch_size: images per batch.
        seed: int.
    """

    def __init__(self, indices, batch_size: int, seed: int):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = int(min(batch_size, self.indices.size))
        self.seed = int(seed)

    def batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(step)])
        return self.indices[rng.choice(self.indices.size, size=self.batch_size, replace=False)]


class ClassBalancedSampler:
    """Class-balanced batches (reference SUN and AWA2).

    Draws ``min(n_classes, batch_size)`` distinct seen classes without
    replacement, then ``max(batch_size // n_classes, 1)`` images of each with
    replacement.

    Args:
        indices: pool of row indices (trainval).
        labels: labels of all rows.
        batch_size: nominal batch size (50 in the reference).
        seed: int.
    """

    def __init__(self, indices, labels, batch_size: int, seed: int):
        indices = np.asarray(indices, dtype=np.int64)
        pool_labels = np.asarray(labels)[indices]
        self.classes = np.unique(pool_labels)
        self.rows_of = [indices[pool_labels == c] for c in self.classes]
        self.batch_size = int(batch_size)
        self.n_classes = int(min(self.classes.size, self.batch_size))
        self.per_class = int(max(self.batch_size // self.classes.size, 1))
        self.seed = int(seed)

    def batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(step)])
        chosen = rng.choice(self.classes.size, size=self.n_classes, replace=False)
        return np.concatenate(
            [self.rows_of[c][rng.integers(0, self.rows_of[c].size, size=self.per_class)] for c in chosen]
        )


class EpochSampler:
    """Shuffled epochs: every image once per epoch, in a new order each epoch.

    The last incomplete batch of an epoch is dropped, so every batch has the same size.
    """

    def __init__(self, indices, batch_size: int, seed: int):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = int(min(batch_size, self.indices.size))
        self.per_epoch = self.indices.size // self.batch_size
        self.seed = int(seed)

    def batch(self, step: int) -> np.ndarray:
        epoch, pos = divmod(int(step), self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.indices.size)
        return self.indices[order[pos * self.batch_size : (pos + 1) * self.batch_size]]


def make_sampler(data: ZSLData, kind: str, batch_size: int, seed: int, indices=None) -> Sampler:
    """Build the sampler named in the config (``random``, ``class_balanced`` or ``epoch``)."""
    indices = data.trainval_loc if indices is None else indices
    if kind == "random":
        return RandomBatchSampler(indices, batch_size, seed)
    if kind == "class_balanced":
        return ClassBalancedSampler(indices, data.labels, batch_size, seed)
    if kind == "epoch":
        return EpochSampler(indices, batch_size, seed)
    raise ValueError(f"unknown sampler {kind!r}; expected random, class_balanced or epoch")


def _native_reader(features):
    """``(read, tf_dtype)``: read rows in the source's stored dtype when it offers that.

    A float16 cache is moved through Python at half the bytes and cast to float32
    inside TensorFlow (the cast is exact).
    """
    import tensorflow as tf

    read_native = getattr(features, "read_native", None)
    dtype = np.dtype(getattr(features, "dtype", np.float32))
    if read_native is None or dtype not in (np.float16, np.float32):
        return features.read, tf.float32
    # A fresh array per batch: tf.numpy_function may wrap a suitably aligned output array
    # without copying it, so a buffer reused for the next batch could change a batch
    # already handed to the model.
    return read_native, tf.as_dtype(dtype)


def shard_of_batch(rows, part: int, count: int):
    """Rows ``part`` of ``count`` equal consecutive slices of a global batch (multi-worker input).

    Every worker draws the same global batch from the sampler (it depends only on the
    seed and the step) and keeps its own slice, so the workers' slices are disjoint
    and together are exactly the single-process batch.
    """
    rows = np.asarray(rows)
    if rows.shape[0] % count:
        raise ValueError(f"a global batch of {rows.shape[0]} rows does not split into {count} equal shards")
    size = rows.shape[0] // count
    return rows[part * size : (part + 1) * size]


def train_dataset(
    data: ZSLData, sampler, start_step: int, num_steps: int, prefetch: int = 2, parallel_reads: int = 2, shard=None
):
    """A tf.data pipeline of ``(features (B, R, F), labels (B,))`` for steps ``[start, start + num)``.

    Feature rows are read from ``data.features`` on background threads while the
    model trains on the previous batch. ``parallel_reads`` batches are read at
    once (the batch of a step depends only on the step, so this is
    deterministic: batches come out in step order, exactly as with one reader).

    ``shard=(parts, count)``: for multi-worker training, each global batch is cut
    into ``count`` equal slices (:func:`shard_of_batch`) and this pipeline yields
    slices ``parts`` (this worker's replicas) of each step in turn.
    """
    import tensorflow as tf

    R, F = data.num_regions, data.feature_dim
    labels = data.labels
    read, tf_dtype = _native_reader(data.features)
    parts, count = ([0], 1) if shard is None else (list(shard[0]), int(shard[1]))

    def fetch(element):
        step, part = divmod(int(element), len(parts))
        rows = shard_of_batch(sampler.batch(int(start_step) + step), parts[part], count)
        return read(rows), labels[rows].astype(np.int64)

    def load(element):
        x, y = tf.numpy_function(fetch, [element], [tf_dtype, tf.int64], stateful=False)
        x.set_shape([None, R, F])
        y.set_shape([None])
        return tf.cast(x, tf.float32), y

    ds = tf.data.Dataset.range(int(num_steps) * len(parts))
    ds = ds.map(load, num_parallel_calls=max(1, int(parallel_reads)), deterministic=True)
    return ds.prefetch(prefetch)


def eval_dataset(data: ZSLData, indices, batch_size: int, prefetch: int = 2, parallel_reads: int = 2):
    """A tf.data pipeline over ``indices`` in order, yielding ``features`` batches."""
    import tensorflow as tf

    indices = np.asarray(indices, dtype=np.int64)
    n_batches = int(np.ceil(indices.size / batch_size))
    R, F = data.num_regions, data.feature_dim
    read, tf_dtype = _native_reader(data.features)

    def fetch(i):
        i = int(i)
        return read(indices[i * batch_size : (i + 1) * batch_size])

    def load(i):
        x = tf.numpy_function(fetch, [i], tf_dtype, stateful=False)
        x.set_shape([None, R, F])
        return tf.cast(x, tf.float32)

    return (
        tf.data.Dataset.range(n_batches)
        .map(load, num_parallel_calls=max(1, int(parallel_reads)), deterministic=True)
        .prefetch(prefetch)
    )
