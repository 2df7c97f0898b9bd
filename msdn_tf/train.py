"""Train MSDN: ``python -m msdn_tf.train --dataset demo``.

The command is thin; :func:`run_training` does the work and is what tests call.
A run directory holds:

* ``config.yaml``: the resolved configuration;
* ``checkpoint/``: weights, optimizer state and progress after every evaluation
  (``--resume`` continues from it, drawing exactly the batches an
  uninterrupted run would);
* ``tensorboard/``: loss terms and U/S/H/CZSL scalars;
* ``model.keras``: the final model; ``results.json`` and ``results.md``: the
  final and best-during-training figures.

The last line of standard output is ``results.json``'s summary as one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from msdn_tf import options
from msdn_tf.backend import current as current_backend
from msdn_tf.backend import on_tensorflow
from msdn_tf.config import Config, from_dict, load_yaml, resolve_config, save_config, value_source
from msdn_tf.errors import ConfigError, MSDNError, NonFiniteError, cli_main, describe_os_error
from msdn_tf.utils import atomic_path, markdown_table, write_json

BEST_NOTE = ("selected on the TEST split over all evaluations during training, as the reference "
             "implementation does; not an unbiased estimate")
VALIDATION_NOTE = ("selected over all evaluations during training on this run's held-out split, which is a "
                   "VALIDATION split (the test split is not used by this run)")


def best_note(dataset_name: str) -> str:
    """What the best-during-training figures were selected on, for a dataset (view) name."""
    return VALIDATION_NOTE if dataset_name.endswith("-validation") else BEST_NOTE


# --------------------------------------------------------------------------- setup helpers
def schedule(config: Config, trainval_size: int) -> tuple:
    """``(iterations, eval_every)`` from the config; defaults follow the reference (§6)."""
    batch = config.data.batch_size
    iterations = config.train.iterations or max(1, trainval_size * config.train.epochs // batch)
    eval_every = config.train.eval_every or max(1, trainval_size // batch)
    return int(iterations), int(min(eval_every, iterations))


def set_seeds(config: Config) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.train.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()


def build_model_from_config(config: Config, data):
    """An initialised, compiled :class:`~msdn_tf.model.MSDN` for ``data`` as ``config`` says.

    The model takes the dtype policy of ``train.precision`` (``auto`` resolved here);
    under ``mixed_float16`` the optimizer is wrapped in a ``LossScaleOptimizer``.
    """
    import keras

    from msdn_tf.model import build_msdn
    from msdn_tf.optimizers import TorchRMSprop
    from msdn_tf.precision import resolve_precision

    precision = resolve_precision(config.train.precision)

    model = build_msdn(
        data.att, data.w2v, data.seen_classes, data.unseen_classes,
        feature_dim=data.feature_dim, num_regions=data.num_regions,
        normalize_attribute_vectors=config.model.normalize_attribute_vectors,
        fusion_weights=config.model.fusion_weights, branches=config.model.branches,
        attention=config.model.attention, bias=config.model.bias,
        lambda_cal=config.loss.lambda_cal, distill_weight=config.loss.distill_weight,
        cross_entropy=config.loss.cross_entropy, calibration=config.loss.calibration,
        distillation=config.loss.distillation, seed=config.train.seed, dtype=precision.policy,
    )
    opt = config.optimizer
    optimizer = TorchRMSprop(learning_rate=opt.learning_rate, rho=opt.rho, epsilon=opt.epsilon,
                             momentum=opt.momentum, coupled_weight_decay=opt.weight_decay)
    if precision.loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer,
                  # train.jit_compile chooses XLA on TensorFlow; on JAX every step is jax.jit-compiled (XLA).
                  jit_compile=config.train.jit_compile or not on_tensorflow())
    return model


# --------------------------------------------------------------------------- checkpoints
class Checkpointer:
    """Step-stamped weights and optimizer state, committed by an atomic ``state.json``.

    A crash at any point leaves the previous checkpoint intact: the new files are
    written first, ``state.json`` is replaced last, and older files are removed after.
    """

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "checkpoint"
        self.state_path = self.dir / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def save(self, model, step: int, history: list, resumes: list = ()) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = f"step_{step:08d}"
        try:
            # numpy, not Keras' HDF5 weights file: HDF5 keeps a failed handle open and the
            # process then crashes at exit (signal 11) on a full disk instead of exiting with 2
            with atomic_path(self.dir / f"{stem}.weights.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, *[np.asarray(v) for v in model.weights])
            with atomic_path(self.dir / f"{stem}.optimizer.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, *[np.asarray(v) for v in model.optimizer.variables])
            write_json(self.state_path, {"step": step, "weights": f"{stem}.weights.npz",
                                         "optimizer": f"{stem}.optimizer.npz", "history": history,
                                         "resumes": list(resumes)})
        except BaseException:
            # state.json still names the previous checkpoint: drop this one's partial files
            current = self.state_path.read_text() if self.state_path.is_file() else ""
            if stem not in current:
                for new in self.dir.glob(f"{stem}.*"):
                    new.unlink()
            raise
        for old in self.dir.glob("step_*"):
            if not old.name.startswith(stem):
                old.unlink()

    def read_state(self) -> dict:
        """``state.json``, checked: a clear error names the file if it is corrupt or incomplete."""
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except ValueError as exc:
            raise MSDNError(f"{self.state_path}: corrupt checkpoint state ({exc}); the run cannot be "
                            "resumed from it: start a new run (another --run-dir)") from exc
        missing = [k for k in ("step", "weights", "optimizer", "history") if not isinstance(state, dict)
                   or k not in state]
        if missing:
            raise MSDNError(f"{self.state_path}: corrupt checkpoint state (missing {', '.join(missing)}); "
                            "start a new run (another --run-dir)")
        for key in ("weights", "optimizer"):
            if not (self.dir / state[key]).is_file():
                raise MSDNError(f"{self.dir / state[key]}: the checkpoint's {key} file is missing; "
                                "the run cannot be resumed: restore the file or start a new run")
        return state

    def restore(self, model) -> dict:
        state = self.read_state()
        path = self.dir / state["weights"]
        try:
            if path.name.endswith(".h5"):  # checkpoints written before the .npz format
                model.load_weights(path)
            else:
                _assign_all(model.weights, _load_arrays(path), path, "model weights")
        except (OSError, ValueError, KeyError) as exc:
            raise MSDNError(f"{path}: unreadable checkpoint weights ({exc}); "
                            "restore the file or start a new run") from exc
        model.optimizer.build(model.trainable_variables)
        try:
            values = _load_arrays(self.dir / state["optimizer"])
        except (OSError, ValueError, KeyError) as exc:
            raise MSDNError(f"{self.dir / state['optimizer']}: unreadable optimizer state ({exc}); "
                            "restore the file or start a new run") from exc
        variables = model.optimizer.variables
        if len(values) != len(variables):
            raise MSDNError(
                f"{self.dir / state['optimizer']}: holds {len(values)} optimizer variables, "
                f"the model's optimizer has {len(variables)}"
            )
        for var, value in zip(variables, values):
            var.assign(value)
        return state


def _load_arrays(path) -> list:
    """The arrays ``arr_0, arr_1, ...`` of an ``.npz`` written by :meth:`Checkpointer.save`."""
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def _assign_all(variables, values, path, what) -> None:
    if len(values) != len(variables):
        raise MSDNError(f"{path}: holds {len(values)} {what}, the model has {len(variables)}")
    for var, value in zip(variables, values):
        if tuple(value.shape) != tuple(var.shape):
            raise MSDNError(f"{path}: {what} '{var.path}' has shape {value.shape} in the checkpoint, "
                            f"{tuple(var.shape)} in the model")
        var.assign(value)


# --------------------------------------------------------------------------- reporting
def _pct(x):
    return 100.0 * float(x)


def results_table(results: dict) -> str:
    rows = []
    final = results["final"]
    rows.append(["final (last step)", final["step"], _pct(final["acc"]), _pct(final["U"]),
                 _pct(final["S"]), _pct(final["H"])])
    for key, label in (("best_H", "best H during training*"), ("best_acc", "best CZSL acc during training*")):
        entry = results["best_on_test"][key]
        if entry is not None:
            rows.append([label, entry["step"], _pct(entry["acc"]), _pct(entry["U"]), _pct(entry["S"]),
                         _pct(entry["H"])])
    table = markdown_table(["selection", "step", "CZSL acc %", "GZSL U %", "GZSL S %", "GZSL H %"], rows)
    return f"{table}\n\n* {results['best_on_test']['note']}."


def _metric_entry(step, metrics, losses=None):
    entry = {"step": int(step), **{k: float(metrics[k]) for k in ("acc", "U", "S", "H")}}
    entry["a2v"] = {k: float(v) for k, v in metrics["a2v"].items()}
    entry["v2a"] = {k: float(v) for k, v in metrics["v2a"].items()}
    if losses:
        entry["losses"] = {k: float(v) for k, v in losses.items()}
    return entry


def _best(history, key):
    candidates = [h for h in history if h["step"] > 0]
    return max(candidates, key=lambda h: (h[key], -h["step"])) if candidates else None


def _strategy(config: Config):
    """The ``tf.distribute`` strategy of ``train.strategy`` (TensorFlow), or ``None`` on JAX.

    Raises:
        ConfigError: an unknown strategy; a strategy other than ``none`` on a backend
            other than TensorFlow; a batch size the replicas cannot share evenly.
    """
    from msdn_tf.distribute import STRATEGIES, get_strategy

    name = config.train.strategy
    if not on_tensorflow():
        if name not in STRATEGIES:
            raise ConfigError(f"'train.strategy': unknown strategy {name!r}; expected one of {STRATEGIES}")
        if name != "none":
            raise ConfigError(
                f"'train.strategy' {name!r}: tf.distribute strategies are TensorFlow-only and Keras runs on "
                f"{current_backend()}; use train.strategy=none (--strategy none), or KERAS_BACKEND=tensorflow "
                "to train with tf.distribute")
        return None
    try:
        strategy = get_strategy(name, timeout_s=config.train.worker_timeout)
    except ValueError as exc:
        raise ConfigError(f"'train.strategy': {exc}") from exc
    if config.data.batch_size % strategy.num_replicas_in_sync:
        raise ConfigError(f"'data.batch_size' {config.data.batch_size} must be divisible by the "
                          f"{strategy.num_replicas_in_sync} replicas of train.strategy={name}")
    return strategy


def _scope(strategy):
    """``strategy.scope()``, or no scope at all without a strategy (JAX)."""
    import contextlib

    return contextlib.nullcontext() if strategy is None else strategy.scope()


# --------------------------------------------------------------------------- training
def default_run_dir(config: Config) -> Path:
    name = config.train.run_name or f"{config.data.dataset}-seed{config.train.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.train.out_dir) / name


def run_training(config: Config, run_dir=None, resume: bool = False, data=None, log=print,
                 eval_hooks=(), resume_changes=None) -> dict:
    """Train and evaluate one MSDN run.

    Args:
        config: the resolved :class:`~msdn_tf.config.Config`.
        run_dir: output folder; default ``<train.out_dir>/<run_name>``.
        resume: continue from the checkpoint in ``run_dir``.
        data: an already loaded :class:`~msdn_tf.data.base.ZSLData` (default: load
            ``config.data.dataset``).
        log: function for progress lines.
        eval_hooks: callables ``hook(model=, data=, step=, metrics=, writer=)`` run after
            every evaluation; ``metrics`` is :func:`~msdn_tf.evaluation.predict.evaluate_model`'s
            result with ``"_logits"`` (e.g. TensorBoard images, see ``msdn_tf.viz``).
        resume_changes: ``{"section.key": (old, new)}`` applied on ``--resume``
            (recorded under ``resumes`` in the checkpoint and ``results.json``).

    Returns:
        The content of ``results.json``.

    Raises:
        NonFiniteError: a NaN or inf appeared (input features, a loss term, the
            gradients, the weights or the evaluation outputs); the message names the
            step and what went non-finite. The last checkpoint stays as it was and
            neither ``model.keras`` nor ``results.json`` is written.
    """
    from msdn_tf.distribute import cluster_info
    from msdn_tf.precision import resolve_precision

    precision = resolve_precision(config.train.precision)  # clear error before anything is written
    config = copy.deepcopy(config)
    config.train.precision = precision.policy  # the saved config holds the precision actually used
    cluster = cluster_info(config.train.strategy)  # clear error on a bad TF_CONFIG
    run_dir = Path(run_dir) if run_dir else default_run_dir(config)
    if run_dir.exists() and not run_dir.is_dir():
        raise MSDNError(f"--run-dir {run_dir}: is a file, not a folder; choose another --run-dir")
    checkpointer = Checkpointer(run_dir)
    if resume and not checkpointer.exists():
        raise MSDNError(f"--resume: no checkpoint in {run_dir / 'checkpoint'}"
                        + ("" if cluster.is_chief else
                           f" (worker {cluster.task_type}[{cluster.index}] resumes from the chief's checkpoint: "
                           "give every worker the same --run-dir on a shared file system, or copy the "
                           "chief's run directory to this path first)"))
    if cluster.is_chief and checkpointer.exists() and not resume:
        raise MSDNError(f"{run_dir} already holds a checkpoint; pass --resume to continue it, "
                        "or choose another --run-dir")
    if resume:  # check the checkpoint before config.yaml is rewritten: a refused resume changes nothing
        done = int(checkpointer.read_state()["step"])
        if config.train.iterations is not None and done > config.train.iterations:
            raise ConfigError(f"--resume: the checkpoint is at step {done}, past train.iterations = "
                              f"{config.train.iterations}; pass --iterations {done} or more")
    strategy = _strategy(config)  # a bad train.strategy or TF_CONFIG fails before anything is written
    if cluster.is_chief:
        out_dir = run_dir
    else:
        # Only the chief writes the run; the others write to a temporary folder, removed at the end.
        out_dir = Path(tempfile.mkdtemp(prefix=f"msdn-{cluster.task_type}{cluster.index}-"))
        log(f"msdn-tf: {cluster.task_type}[{cluster.index}] of {cluster.num_workers}: not the chief, "
            f"writing to the temporary {out_dir} (removed at the end)")
    try:
        return _train(config, run_dir, out_dir, checkpointer, resume, data, log, eval_hooks, precision, cluster,
                      strategy, resume_changes)
    finally:
        if out_dir != run_dir:
            shutil.rmtree(out_dir, ignore_errors=True)


def _train(config, run_dir, out_dir, checkpointer, resume, data, log, eval_hooks, precision, cluster, strategy,
           resume_changes):
    """:func:`run_training` after the run directory checks; writes go to ``out_dir``."""
    import tensorflow as tf

    from msdn_tf.data.pipeline import make_sampler, train_dataset
    from msdn_tf.data.registry import load_dataset
    from msdn_tf.evaluation.predict import evaluate_model

    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.yaml")
    log(f"msdn-tf: precision {precision.policy} ({precision.reason})")

    set_seeds(config)
    data = data if data is not None else load_dataset(config)
    iterations, eval_every = schedule(config, len(data.trainval_loc))
    with _scope(strategy):  # variables (model and optimizer) mirrored over the replicas
        model = build_model_from_config(config, data)
    multi_worker = config.train.strategy == "multi_worker"
    # Keras' fit cannot run under MultiWorkerMirroredStrategy (it reduces a first
    # batch, then the scalar logs, along axis 0: "PerReplica ... unsupported type");
    # across processes the same train_step runs in a small loop (_MultiWorkerLoop).
    loop = _MultiWorkerLoop(model, strategy) if multi_worker else None
    saver = Checkpointer(out_dir)  # restores come from run_dir's (the chief's) checkpoint
    sampler = make_sampler(data, config.data.sampler, config.data.batch_size, config.train.seed)
    log(f"msdn-tf: {json.dumps(data.summary())}")
    log(f"msdn-tf: {iterations} iterations, evaluation every {eval_every}, run dir {run_dir}")

    history, step, resumes = [], 0, []
    if resume:
        with _scope(strategy):
            state = checkpointer.restore(model)
        history, step = state["history"], int(state["step"])
        resumes = list(state.get("resumes", []))
        if step > iterations:
            raise ConfigError(f"--resume: the checkpoint is at step {step}, past train.iterations = "
                              f"{iterations}; pass --iterations {step} or more")
        if resume_changes:
            resumes.append({"step": step, "changes": resume_changes})
        log(f"msdn-tf: resumed at step {step}"
            + (f" with {', '.join(f'{k}: {a} -> {b}' for k, (a, b) in resume_changes.items())}"
               if resume_changes else ""))
        purged = purge_events_after(run_dir / "tensorboard", step) if cluster.is_chief else 0
        if purged:
            log(f"msdn-tf: removed {purged} TensorBoard events past step {step} (written before the interruption)")
    elif config.train.eval_initial:
        initial = evaluate_model(model, data, config.data.eval_batch_size)
        history.append(_metric_entry(0, initial))
    if config.train.tensorboard_images:
        from msdn_tf.viz.tensorboard import make_eval_hooks

        eval_hooks = tuple(eval_hooks) + tuple(make_eval_hooks(config, data))

    from msdn_tf.data.device import DeviceFeatures, device_train_dataset, use_on_device

    device_store = None  # training rows held in TensorFlow memory (outside the strategy scope)
    if not on_tensorflow():
        if config.data.on_device is not False:
            log(f"msdn-tf: data.on_device={config.data.on_device} holds rows in TensorFlow memory, which only "
                f"the TensorFlow backend can use; on {current_backend()} batches come from the host pipeline")
    elif use_on_device(config.data.on_device, data):
        device_store = DeviceFeatures(data.features, data.trainval_loc)
        log(f"msdn-tf: training features on device ({device_store.nbytes / 1e6:.0f} MB, {device_store.dtype})")

    writer = tf.summary.create_file_writer(str(out_dir / "tensorboard"))
    verbose = config.train.verbose if config.train.verbose >= 0 else (1 if sys.stdout.isatty() else 2)
    log_cb = _TensorBoardLosses(writer, config.train.log_every)
    guard = _NonFiniteGuard()
    model.check_numerics = config.train.check_numerics
    started = time.time()
    n_periods = math.ceil(iterations / eval_every)
    while step < iterations:
        steps = min(eval_every, iterations - step)
        period = step // eval_every + 1
        if verbose:
            log(f"period {period}/{n_periods}: steps {step + 1}-{step + steps}")
        log_cb.offset = guard.offset = step
        if device_store is not None:
            make = functools.partial(device_train_dataset, device_store, data.labels, sampler, step, steps,
                                     config.data.prefetch)
        else:
            make = functools.partial(train_dataset, data, sampler, step, steps, config.data.prefetch)
        if multi_worker:
            dataset = strategy.distribute_datasets_from_function(
                lambda ctx: make(shard=_worker_shard(ctx, strategy.num_replicas_in_sync)))
            try:
                logs = loop.run(dataset, steps, [guard, log_cb])
            except (tf.errors.OpError, RuntimeError) as exc:
                last = f"from the checkpoint of step {step}" if checkpointer.exists() or step else "from the start"
                raise MSDNError(
                    f"{cluster.task_type}[{cluster.index}]: training across the TF_CONFIG cluster stopped in "
                    f"steps {step + 1}-{step + steps} (a worker stopped or is unreachable). Restart EVERY "
                    f"worker with: python -m msdn_tf.train --run-dir {run_dir} --resume (continues {last}). "
                    f"TensorFlow said: {str(exc).splitlines()[0][:300]}") from exc
        else:
            fit = model.fit(make(), epochs=1, verbose=verbose, callbacks=[guard, log_cb], shuffle=False)
            logs = {k: v[-1] for k, v in fit.history.items()}
        if guard.failure is not None:
            writer.flush()
            raise NonFiniteError(_nonfinite_message(guard, data, sampler, checkpointer, strategy))
        step += steps
        losses = {k: v for k, v in logs.items() if k != "nonfinite"}
        try:
            metrics = evaluate_model(model, data, config.data.eval_batch_size, return_logits=bool(eval_hooks))
        except NonFiniteError as exc:
            raise NonFiniteError(f"evaluation after step {step}: {exc}. {_checkpoint_note(checkpointer)}") from exc
        entry = _metric_entry(step, metrics, losses)
        history.append(entry)
        with writer.as_default(step=step):
            for key in ("acc", "U", "S", "H"):
                tf.summary.scalar(f"eval/{key}", entry[key])
            for key, value in losses.items():
                tf.summary.scalar(f"period/{key}", value)
        for hook in eval_hooks:
            hook(model=model, data=data, step=step, metrics=metrics, writer=writer)
        writer.flush()
        try:
            saver.save(model, step, history, resumes)
        except OSError as exc:
            then = (f"; once there is room, continue with python -m msdn_tf.train --run-dir {run_dir} --resume"
                    if checkpointer.exists() else "")
            raise MSDNError(f"saving the checkpoint of step {step}: {describe_os_error(exc)} "
                            f"{_checkpoint_note(checkpointer)}{then}") from exc
        log(f"step {step}: CZSL acc {_pct(entry['acc']):.2f}  U {_pct(entry['U']):.2f}  "
            f"S {_pct(entry['S']):.2f}  H {_pct(entry['H']):.2f}  loss {losses.get('loss', float('nan')):.4f}")

    try:
        with atomic_path(out_dir / "model.keras") as tmp:
            model.save(tmp)
    except OSError as exc:
        raise MSDNError(f"saving the trained model: {describe_os_error(exc)} {_checkpoint_note(checkpointer)}; "
                        f"once there is room, python -m msdn_tf.train --run-dir {run_dir} --resume "
                        "writes the model and results from it") from exc
    results = {
        "dataset": config.data.dataset,
        "run_dir": str(run_dir),
        "data": data.summary(),
        "iterations": iterations,
        "seed": config.train.seed,
        "backend": current_backend(),
        "precision": precision.to_dict(),
        "strategy": {"name": config.train.strategy, "workers": cluster.num_workers,
                     "replicas": 1 if strategy is None else int(strategy.num_replicas_in_sync)},
        "train_seconds_this_session": round(time.time() - started, 2),
        "initial": history[0] if history and history[0]["step"] == 0 else None,
        "final": history[-1],
        "best_on_test": {"note": best_note(data.name), "best_H": _best(history, "H"), "best_acc": _best(history, "acc")},
        "history": history,
        "resumes": resumes,
    }
    write_json(out_dir / "results.json", results)
    table = results_table(results)
    from msdn_tf.utils import atomic_write_text

    atomic_write_text(out_dir / "results.md", f"# {config.data.dataset} (seed {config.train.seed})\n\n{table}\n")
    log(table)
    return results


class _MultiWorkerLoop:
    """``model.train_step`` over a distributed dataset under MultiWorkerMirroredStrategy.

    What ``fit`` does for one epoch, reduced to what training needs: the loss
    trackers are reset, every step runs ``train_step`` on each replica (the
    optimizer all-reduces the gradients), and the returned logs are the running
    means over the period, as ``fit``'s history holds.
    """

    def __init__(self, model, strategy):
        import tensorflow as tf

        self.model, self.strategy = model, strategy

        @tf.function
        def step_fn(iterator):
            per_replica = strategy.run(model.train_step, args=(next(iterator),))
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


def _worker_shard(ctx, num_replicas: int):
    """``(parts, count)``: the slices of every global batch this worker's replicas train on.

    ``count`` is the number of replicas in sync; a worker with ``L`` local replicas
    (input pipeline ``i`` of ``n``) takes slices ``i*L .. i*L + L - 1``, one per replica.
    """
    local = num_replicas // ctx.num_input_pipelines
    return list(range(ctx.input_pipeline_id * local, (ctx.input_pipeline_id + 1) * local)), num_replicas


class _TensorBoardLosses:
    """Keras callback writing the running loss terms every ``every`` steps."""

    def __new__(cls, writer, every):
        import keras

        class Callback(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.offset = 0

            def on_train_batch_end(self, batch, logs=None):
                step = self.offset + batch + 1
                if logs and step % every == 0:
                    import tensorflow as tf

                    with writer.as_default(step=step):
                        for key, value in logs.items():
                            if key != "nonfinite":  # a check code (0 while all is finite), not a loss
                                tf.summary.scalar(f"train/{key}", float(value))

        return Callback()


class _NonFiniteGuard:
    """Keras callback that stops ``fit`` at the first step with a NaN or inf.

    It reads what the training step already returns: the running means of the loss
    terms (non-finite from the first bad step on) and the ``nonfinite`` code of
    :meth:`msdn_tf.model.MSDN.nonfinite_code` (input features, gradients, updated weights).
    """

    def __new__(cls):
        import keras

        class Callback(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.offset = 0
                self.failure = None  # (step, non-finite loss terms, failed checks code)

            def on_train_batch_end(self, batch, logs=None):
                logs = logs or {}
                code = float(logs.get("nonfinite", 0.0))
                terms = [k for k, v in logs.items() if k != "nonfinite" and not math.isfinite(float(v))]
                if code or terms:
                    self.failure = (self.offset + batch + 1, terms, code)
                    self.model.stop_training = True

        return Callback()


def _checkpoint_note(checkpointer) -> str:
    if checkpointer.exists():
        try:
            step = json.loads(checkpointer.state_path.read_text())["step"]
            return f"The checkpoint of step {step} in {checkpointer.dir} is intact"
        except (OSError, ValueError, KeyError):
            pass
    return "No checkpoint was written"


def _nonfinite_message(guard, data, sampler, checkpointer, strategy) -> str:
    """Name the step and what went non-finite first: input rows, loss terms, gradients or weights."""
    from msdn_tf.data.base import describe_rows, feature_file, nonfinite_rows
    from msdn_tf.model import NONFINITE_CHECKS

    step, terms, code = guard.failure
    base = (1 if strategy is None else strategy.num_replicas_in_sync) + 1  # no strategy on JAX
    failed = [name for i, name in enumerate(NONFINITE_CHECKS) if int(code) // base ** i % base]
    head = f"training step {step}: "
    tail = f". Nothing was saved for this run's result. {_checkpoint_note(checkpointer)}."
    if "input features" in failed:
        batch = sampler.batch(step - 1)
        rows = nonfinite_rows(data.features, batch)
        where = feature_file(data.features, data.source)
        which = (f"feature {describe_rows(rows)}" if rows.size else
                 f"one of the feature {describe_rows(np.unique(batch), limit=60)} (they read back finite now)")
        return head + f"the input batch holds NaN or infinite values: {where}, {which}; fix or drop these images" + tail
    if terms:
        return (head + f"loss term{'s' if len(terms) > 1 else ''} {', '.join(terms)} became NaN or infinite "
                "(inputs were finite); lower optimizer.learning_rate or check the loss settings" + tail)
    if "gradients" in failed:
        return head + "the gradients hold NaN or infinite values (the loss terms were finite)" + tail
    return (head + "the weights became NaN or infinite in the update (inputs, loss and gradients were "
            "finite); check the optimizer settings" + tail)


def purge_events_after(folder, step: int) -> int:
    """Remove the TensorBoard summaries written past ``step`` (by a session that was interrupted).

    A resumed run writes those steps again; without this TensorBoard shows both.
    Each event file holding such events is rewritten (to a temporary file, then
    renamed) without them. Returns the number of events removed.
    """
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    removed = 0
    for path in sorted(Path(folder).rglob("events.out.tfevents.*")):
        kept, dropped = [], 0
        try:
            for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
                event = event_pb2.Event.FromString(record)
                if event.HasField("summary") and event.step > step:
                    dropped += 1
                else:
                    kept.append(record)
        except tf.errors.DataLossError:
            pass  # a record cut short by the interruption: drop the tail
        if dropped:
            with atomic_path(path) as tmp:
                with tf.io.TFRecordWriter(tmp) as out:
                    for record in kept:
                        out.write(record)
            removed += dropped
    return removed


def summary_line(results: dict) -> str:
    """The one-line JSON printed last: final and best-on-test figures."""
    final = results["final"]
    best = results["best_on_test"]
    return json.dumps({
        "dataset": results["dataset"], "run_dir": results["run_dir"], "seed": results["seed"],
        "final": {k: round(final[k], 4) for k in ("step", "acc", "U", "S", "H")},
        "best_H_on_test": None if best["best_H"] is None else {k: round(best["best_H"][k], 4) for k in ("step", "acc", "U", "S", "H")},
        "best_acc_on_test": None if best["best_acc"] is None else {k: round(best["best_acc"][k], 4) for k in ("step", "acc", "U", "S", "H")},
    })


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    from msdn_tf.data.registry import DATASETS

    p = argparse.ArgumentParser(prog="python -m msdn_tf.train", description="Train MSDN for zero-shot learning.")
    p.add_argument("--dataset", help=f"dataset name: {', '.join(sorted(DATASETS))} (default demo)")
    p.add_argument("--data-dir", help="folder with the dataset files (see README)")
    p.add_argument("--config", action="append", default=[], help="extra YAML config file(s) applied in order")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.iterations=100")
    p.add_argument("--seed", type=int, help="shortcut for --set train.seed=N")
    p.add_argument("--iterations", type=int, help="shortcut for --set train.iterations=N")
    p.add_argument("--run-dir", help="output folder (default runs/<dataset>-seed<N>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.add_argument("--strategy", choices=list(options.STRATEGIES),
                   help="shortcut for --set train.strategy=NAME (tf.distribute; multi_worker reads TF_CONFIG)")
    p.add_argument("--precision", choices=list(options.PRECISIONS),
                   help="shortcut for --set train.precision=NAME (auto: bfloat16 where the hardware runs it "
                        "natively, else float32)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def config_from_args(args) -> Config:
    overrides = list(args.set)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.iterations is not None:
        overrides.append(f"train.iterations={args.iterations}")
    if getattr(args, "strategy", None):
        overrides.append(f"train.strategy={args.strategy}")
    if getattr(args, "precision", None):
        overrides.append(f"train.precision={args.precision}")
    return resolve_config(args.dataset or "demo", args.config, overrides)


def resume_config(args) -> tuple:
    """``(config, changes)`` of ``--resume``: the run's own config plus the flags that are safe.

    A resumed run continues what its checkpoint was trained with. Safe to change:
    ``--iterations`` (more steps: the run then equals an uninterrupted run of that
    length, as batches depend only on the step) and ``--data-dir`` (the same data,
    moved; the dataset's size checks still apply). Every other flag that would
    change the run is refused, naming it and why. ``changes`` is
    ``{"section.key": (old, new)}``, recorded in the run.
    """
    from msdn_tf.config import canonical_dataset_name

    if not args.run_dir:
        raise ConfigError("--resume needs --run-dir")
    path = Path(args.run_dir) / "config.yaml"
    if Path(args.run_dir).exists() and not Path(args.run_dir).is_dir():
        raise MSDNError(f"--run-dir {args.run_dir}: is a file, not a folder")
    config = from_dict(load_yaml(path), str(path))
    why = "the checkpoint was trained with the run's own config.yaml; start a new run (another --run-dir) to change it"
    refused = []
    if args.dataset is not None and canonical_dataset_name(args.dataset) != config.data.dataset:
        refused.append(f"--dataset {args.dataset} (the run is {config.data.dataset})")
    if args.seed is not None and args.seed != config.train.seed:
        refused.append(f"--seed {args.seed} (the run's seed is {config.train.seed})")
    if args.strategy is not None and args.strategy != config.train.strategy:
        refused.append(f"--strategy {args.strategy} (the run used {config.train.strategy})")
    refused += [f"--config {c}" for c in args.config] + [f"--set {t}" for t in args.set]
    if refused:
        raise ConfigError(f"--resume: refusing {'; '.join(refused)}: {why}. "
                          "Only --iterations (more steps) and --data-dir (moved data) can change on resume")
    changes = {}
    if args.iterations is not None and args.iterations != config.train.iterations:
        changes["train.iterations"] = (config.train.iterations, int(args.iterations))
    if args.data_dir is not None and args.data_dir != config.data.data_dir:
        changes["data.data_dir"] = (config.data.data_dir, args.data_dir)
    if changes:
        overrides = [f"{key}={new}" for key, (_, new) in changes.items()]
        from msdn_tf.config import merge, parse_override, validate

        for text in overrides:
            merge(config, parse_override(text), f"--resume {text}")
        validate(config)
    return config, changes


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    changes = None
    if args.resume:
        config, changes = resume_config(args)
    else:
        config = config_from_args(args)
    if args.print_config:
        from msdn_tf.config import to_yaml

        print(to_yaml(config))
        return 0
    from msdn_tf.data.registry import get_spec

    get_spec(config.data.dataset)  # fail fast on an unknown name, before TensorFlow starts
    results = run_training(config, run_dir=args.run_dir, resume=args.resume, resume_changes=changes)
    print(summary_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
