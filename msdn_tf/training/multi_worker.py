"""Training across processes (``train.strategy=multi_worker``, TF_CONFIG): the step loop and the input split.

Keras' ``fit`` cannot run under MultiWorkerMirroredStrategy (it reduces a first batch,
then the scalar logs, along axis 0: "PerReplica ... unsupported type"); across processes
the same ``train_step`` runs in :class:`MultiWorkerLoop`. docs/distributed.md describes
the whole set-up.
"""

from __future__ import annotations


class MultiWorkerLoop:
    """``model.train_step`` over a distributed dataset under MultiWorkerMirroredStrategy.

    What ``fit`` does for one epoch, reduced to what training needs: the loss
    trackers are reset, every step runs ``train_step`` on each replica (the
    optimizer all-reduces the gradients), and the returned logs are the running
    means over the period, as ``fit``'s history holds.
    """

    def __init__(self, model, strategy):
        import tensorflow as tf

        self.model, self.strategy = model, strategy

        from msdn_tf.model import NONFINITE

        def replica_step(batch):
            logs = model.train_step(batch)
            if model.check_numerics:  # the non-finite guard's code, not a metric of train_step
                logs[NONFINITE] = model.trackers[NONFINITE].result()
            return logs

        @tf.function
        def step_fn(iterator):
            per_replica = strategy.run(replica_step, args=(next(iterator),))
            # Equal slices on every replica: the mean of the replicas' means is the global mean.
            return {k: strategy.reduce("MEAN", v, axis=None) for k, v in per_replica.items()}

        self.step_fn = step_fn

    def run(self, dataset, steps: int, callbacks) -> dict:
        self.model.reset_metrics()
        self.model.stop_training = False
        for callback in callbacks:
            callback.set_model(self.model)
        iterator = iter(dataset)
        logs = {}
        for batch in range(steps):
            logs = {k: float(v) for k, v in self.step_fn(iterator).items()}
            for callback in callbacks:
                callback.on_train_batch_end(batch, logs)
            if self.model.stop_training:  # the non-finite guard stopped it
                break
        return logs


def worker_shard(ctx, num_replicas: int):
    """``(parts, count)``: the slices of every global batch this worker's replicas train on.

    ``count`` is the number of replicas in sync; a worker with ``L`` local replicas
    (input pipeline ``i`` of ``n``) takes slices ``i*L .. i*L + L - 1``, one per replica.
    """
    local = num_replicas // ctx.num_input_pipelines
    return list(range(ctx.input_pipeline_id * local, (ctx.input_pipeline_id + 1) * local)), num_replicas
