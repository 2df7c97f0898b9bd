"""The JAX training loop: training rows held on the device, many steps per dispatch.

Keras' ``fit`` on JAX calls its jitted step once per batch and feeds it a batch
from the host every time. On an accelerator a step at CUB shapes takes a fraction
of a millisecond, so that loop spends its time in Python and host-to-device copies,
not in the model. :class:`DeviceLoop` instead

* copies the training rows to the device ONCE (:class:`DeviceRows`; the source's own
  dtype, so a float16 cache stays float16 there),
* computes the sampler's batches of a whole period up front as a ``(steps, B)``
  table of positions (:func:`msdn_tf.data.device.batch_table`: the same
  ``sampler.batch(step)`` as the tf.data pipelines, so the same batches), and
* runs the period in ONE call of a jitted function: a ``lax.fori_loop`` over the
  steps, each step a gather from the held rows and :func:`msdn_tf.training_jax.train_step`,
  the model's one step definition (:meth:`MSDN.step_loss`, :meth:`MSDN.record_step`).

The trip count is an argument and the tables are padded to the longest period,
so one compilation serves every period of a run. The per-step logs (running
means, the non-finite code) come back as one small ``(steps, terms)`` array and
are replayed through the same Keras callbacks ``fit`` calls
(:class:`~msdn_tf.training.nonfinite.NonFiniteGuard`, TensorBoard losses). The
weights go back into the Keras variables after every period, so evaluation,
checkpoints and ``--resume`` are those of the ``fit`` path: a run resumed at any
evaluation point draws the batches the uninterrupted run draws.

Selected on the JAX backend by ``data.on_device`` (``auto``: when the rows fit
:func:`msdn_tf.data.device.memory_budget_bytes`); otherwise ``fit`` on the host
pipeline runs. This module imports JAX, never TensorFlow.
"""

from __future__ import annotations

import time

import numpy as np

from msdn_tf.data.device import CHUNK_ROWS, batch_table, storage_dtype

MAX_STEPS_PER_DISPATCH = 2000  # a longer period runs as several dispatches (progress lines between them)


class DeviceRows:
    """Rows of a :class:`~msdn_tf.data.base.FeatureSource` held as one JAX array on the default device.

    Args:
        features: the source (``read_native`` or ``read``).
        rows: the global row ids to hold (e.g. trainval).
        dtype: storage dtype, default :func:`~msdn_tf.data.device.storage_dtype` of the source.

    Rows are read ``CHUNK_ROWS`` at a time into one host buffer, then transferred once.
    """

    def __init__(self, features, rows, dtype=None):
        import jax

        self.rows = np.unique(np.asarray(rows, dtype=np.int64))
        self.dtype = np.dtype(dtype) if dtype is not None else storage_dtype(features)
        _, R, F = features.shape
        read = getattr(features, "read_native", None) or features.read
        host = np.empty((self.rows.size, R, F), dtype=self.dtype)
        for start in range(0, self.rows.size, CHUNK_ROWS):
            host[start : start + CHUNK_ROWS] = read(self.rows[start : start + CHUNK_ROWS])
        self.values = jax.device_put(host)
        del host

    @property
    def nbytes(self) -> int:
        return int(self.values.size) * self.dtype.itemsize

    def positions(self, rows) -> np.ndarray:
        """Positions in :attr:`values` of global ``rows`` (all must be held)."""
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.searchsorted(self.rows, rows)
        if np.any(pos >= self.rows.size) or np.any(self.rows[np.minimum(pos, self.rows.size - 1)] != rows):
            raise ValueError("rows not held on the device were requested")
        return pos


def model_state(model) -> tuple:
    """``(trainable, non_trainable, optimizer, metrics)`` values: the state :func:`training_jax.train_step` takes."""
    return (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )


def set_model_state(model, state) -> None:
    """Write a :func:`model_state` back into the model's variables."""
    groups = (
        model.trainable_variables,
        model.non_trainable_variables,
        model.optimizer.variables,
        model.metrics_variables,
    )
    for variables, values in zip(groups, state):
        for variable, value in zip(variables, values):
            variable.assign(value)


def make_multi_step(model, max_steps: int):
    """A jitted ``run(state, rows, positions, labels, n) -> (state, logs (max_steps, L))`` and the log names.

    ``positions``/``labels`` are ``(max_steps, B)`` tables; the first ``n`` steps run
    (``lax.fori_loop`` with a traced trip count: one compilation for every ``n``).
    Each step gathers its batch from ``rows`` (cast to float32, as the tf.data
    pipelines do) and runs :func:`msdn_tf.training_jax.train_step`. Row ``i`` of the
    logs holds the running means after step ``i`` (NaN past ``n``). The input state
    is donated (its buffers are reused for the output).
    """
    import jax
    import jax.numpy as jnp

    from msdn_tf import training_jax

    names = []  # filled when the function is traced (the step's log keys, in sorted order)

    def run(state, rows, positions, labels, n):
        def body(i, carry):
            state, logs = carry
            x = jnp.take(rows, positions[i], axis=0).astype("float32")
            step_logs, state = training_jax.train_step(model, state, (x, labels[i]))
            row = jnp.stack([jnp.asarray(step_logs[k], "float32") for k in names])
            return state, logs.at[i].set(row)

        if not names:  # the log keys: trace one step abstractly
            spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
            step = lambda s, x, y: training_jax.train_step(model, s, (x, y))[0]  # noqa: E731
            x = jax.ShapeDtypeStruct((positions.shape[1],) + rows.shape[1:], "float32")
            names.extend(sorted(jax.eval_shape(step, jax.tree.map(spec, state), x, spec(labels[0]))))
        logs = jnp.full((max_steps, len(names)), jnp.nan, "float32")
        return jax.lax.fori_loop(0, n, body, (state, logs))

    return jax.jit(run, donate_argnums=(0,)), names


class DeviceLoop:
    """The JAX training loop of a run: the training rows on the device, a period per dispatch.

    Args:
        model: the compiled :class:`~msdn_tf.model.MSDN` (JAX backend).
        data: the :class:`~msdn_tf.data.base.ZSLData` (its trainval rows are held).
        sampler: the run's batch sampler.
        max_steps: the longest period of the run (tables are padded to it, up to
            :data:`MAX_STEPS_PER_DISPATCH`).
        rows: optional :class:`DeviceRows` already built (default: the trainval rows).

    Example:
        >>> loop = DeviceLoop(model, data, sampler, max_steps=100)
        >>> logs = loop.train(start_step=0, steps=100)   # the period's running-mean logs
    """

    def __init__(self, model, data, sampler, max_steps: int, rows=None):
        self.model = model
        self.labels = np.asarray(data.labels)
        self.sampler = sampler
        self.store = rows if rows is not None else DeviceRows(data.features, data.trainval_loc)
        self.max_steps = int(max(1, min(max_steps, MAX_STEPS_PER_DISPATCH)))
        self._run, self.log_names = make_multi_step(model, self.max_steps)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    @property
    def dtype(self):
        return self.store.dtype

    def _tables(self, start_step: int, steps: int) -> tuple:
        table, labels = batch_table(self.store.positions, self.labels, self.sampler, start_step, steps)
        pad = self.max_steps - steps
        if pad:  # padded rows are never run (the loop stops at n); repeat the first batch
            table = np.concatenate([table, np.repeat(table[:1], pad, axis=0)])
            labels = np.concatenate([labels, np.repeat(labels[:1], pad, axis=0)])
        return table.astype(np.int32), labels

    def train(self, start_step: int, steps: int, callbacks=(), log=None) -> dict:
        """Train steps ``start_step + 1 .. start_step + steps``; the logs after the last step.

        ``callbacks``: Keras callbacks whose ``on_train_batch_end(batch, logs)`` is
        called for every step in order, as ``fit`` calls it (``batch`` counts from 0
        in this period); training stops early when one sets ``model.stop_training``.
        ``log``: a function for one progress line per dispatch (``None``: quiet).
        """
        import jax
        import jax.numpy as jnp

        model = self.model
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.reset_metrics()  # fit does this at the start of every epoch: logs are this period's means
        model.stop_training = False
        for cb in callbacks:
            cb.set_model(model)
        logs, done = {}, 0
        while done < steps and not model.stop_training:
            n = min(self.max_steps, steps - done)
            table, labels = self._tables(start_step + done, n)
            started = time.perf_counter()
            state = model_state(model)
            state, rows = self._run(state, self.store.values, jnp.asarray(table), jnp.asarray(labels), n)
            set_model_state(model, state)
            rows = np.asarray(jax.device_get(rows))[:n]
            seconds = time.perf_counter() - started
            for i, row in enumerate(rows):
                logs = dict(zip(self.log_names, row.tolist()))
                for cb in callbacks:
                    cb.on_train_batch_end(done + i, logs)
                if model.stop_training:
                    break
            done += n
            if log is not None:
                batch = table.shape[1]
                log(
                    f"steps {start_step + done - n + 1}-{start_step + done}: loss {logs.get('loss', float('nan')):.4f} "
                    f"({n / seconds:.1f} steps/s, {n * batch / seconds:.0f} images/s, one dispatch)"
                )
        return logs
