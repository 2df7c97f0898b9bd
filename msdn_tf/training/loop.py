"""The training loop: ``run_training`` (what ``python -m msdn_tf.train`` calls), in small steps.

A run directory holds:

* ``config.yaml``: the resolved configuration;
* ``checkpoint/``: weights, optimizer state and progress after every evaluation
  (:mod:`msdn_tf.training.checkpoint`; ``--resume`` continues from it, drawing exactly
  the batches an uninterrupted run would);
* TensorBoard events (in the run directory itself, so TensorBoard names the run after it):
  loss terms and U/S/H/CZSL scalars from step 0 on, the config (hparams plugin) and the
  final figures (:mod:`msdn_tf.training.reporting`);
* ``model.keras``: the final model; ``results.json`` and ``results.md``: the
  final and best-during-training figures.

:func:`run_training` checks the run directory (:func:`prepare_run`), then a
:class:`TrainingSession` builds the model and data, restores or starts, and runs
periods of ``eval_every`` steps (train, evaluate, checkpoint) before :func:`finish`
writes the model and the results.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from msdn_tf.backend import current as current_backend
from msdn_tf.backend import on_tensorflow
from msdn_tf.config import Config, save_config
from msdn_tf.errors import ConfigError, MSDNError, NonFiniteError, describe_os_error
from msdn_tf.training.checkpoint import Checkpointer, checkpoint_note
from msdn_tf.training.reporting import (
    build_results,
    metric_entry,
    pct,
    purge_events_after,
    tensorboard_dir,
    write_eval_summaries,
    write_final_summaries,
    write_hparams,
    write_results,
)
from msdn_tf.utils import atomic_path


# --------------------------------------------------------------------------- setup helpers
def schedule(config: Config, trainval_size: int) -> tuple:
    """``(iterations, eval_every)`` from the config; defaults follow the reference (§6)."""
    batch = config.data.batch_size
    iterations = config.train.iterations or max(1, trainval_size * config.train.epochs // batch)
    eval_every = config.train.eval_every or max(1, trainval_size // batch)
    return int(iterations), int(min(eval_every, iterations))


def evaluation_steps(iterations: int, eval_every: int, eval_offset: int = 0) -> list:
    """The steps after which a run evaluates: ``eval_offset`` (or ``eval_every`` when it
    is 0), then every ``eval_every`` steps, and always the last step.

    Example:
        >>> evaluation_steps(10, 4, 1)   # the reference's points (docs/reference.md §6)
        [1, 5, 9, 10]
        >>> evaluation_steps(10, 4)
        [4, 8, 10]
    """
    first = eval_offset if eval_offset > 0 else eval_every
    points = list(range(first, iterations + 1, eval_every))
    return points if points and points[-1] == iterations else points + [iterations]


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
        data.att,
        data.w2v,
        data.seen_classes,
        data.unseen_classes,
        feature_dim=data.feature_dim,
        num_regions=data.num_regions,
        normalize_attribute_vectors=config.model.normalize_attribute_vectors,
        fusion_weights=config.model.fusion_weights,
        branches=config.model.branches,
        attention=config.model.attention,
        bias=config.model.bias,
        lambda_cal=config.loss.lambda_cal,
        distill_weight=config.loss.distill_weight,
        cross_entropy=config.loss.cross_entropy,
        calibration=config.loss.calibration,
        distillation=config.loss.distillation,
        seed=config.train.seed,
        dtype=precision.policy,
    )
    opt = config.optimizer
    optimizer = TorchRMSprop(
        learning_rate=opt.learning_rate,
        rho=opt.rho,
        epsilon=opt.epsilon,
        momentum=opt.momentum,
        coupled_weight_decay=opt.weight_decay,
    )
    if precision.loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        # train.jit_compile chooses XLA on TensorFlow; on JAX every step is jax.jit-compiled (XLA).
        jit_compile=config.train.jit_compile or not on_tensorflow(),
    )
    return model


def make_strategy(config: Config):
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
                "to train with tf.distribute"
            )
        return None
    try:
        strategy = get_strategy(name, timeout_s=config.train.worker_timeout)
    except ValueError as exc:
        raise ConfigError(f"'train.strategy': {exc}") from exc
    if config.data.batch_size % strategy.num_replicas_in_sync:
        raise ConfigError(
            f"'data.batch_size' {config.data.batch_size} must be divisible by the "
            f"{strategy.num_replicas_in_sync} replicas of train.strategy={name}"
        )
    return strategy


def strategy_scope(strategy):
    """``strategy.scope()``, or no scope at all without a strategy (JAX)."""
    import contextlib

    return contextlib.nullcontext() if strategy is None else strategy.scope()


# --------------------------------------------------------------------------- the run
def default_run_dir(config: Config) -> Path:
    name = config.train.run_name or f"{config.data.dataset}-seed{config.train.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.train.out_dir) / name


def prepare_run(config: Config, run_dir, resume: bool) -> tuple:
    """``(config, precision, cluster, run_dir, checkpointer)`` after every check that precedes a write.

    The precision is resolved (``auto`` -> the policy used, recorded in the returned
    config copy), TF_CONFIG is read, and the run directory is checked: a file where the
    folder should be, ``--resume`` without a checkpoint, a checkpoint without
    ``--resume``, or a checkpoint past ``train.iterations`` is refused here.
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
    check_checkpoint(checkpointer, config, run_dir, resume, cluster)
    return config, precision, cluster, run_dir, checkpointer


def check_checkpoint(checkpointer, config: Config, run_dir: Path, resume: bool, cluster) -> None:
    """Refuse ``--resume`` without a checkpoint, a new run over one, or one past ``train.iterations``."""
    if resume and not checkpointer.exists():
        raise MSDNError(
            f"--resume: no checkpoint in {run_dir / 'checkpoint'}"
            + (
                ""
                if cluster.is_chief
                else f" (worker {cluster.task_type}[{cluster.index}] resumes from the chief's checkpoint: "
                "give every worker the same --run-dir on a shared file system, or copy the "
                "chief's run directory to this path first)"
            )
        )
    if cluster.is_chief and checkpointer.exists() and not resume:
        raise MSDNError(
            f"{run_dir} already holds a checkpoint; pass --resume to continue it, or choose another --run-dir"
        )
    if resume:  # check the checkpoint before config.yaml is rewritten: a refused resume changes nothing
        done = int(checkpointer.read_state()["step"])
        if config.train.iterations is not None and done > config.train.iterations:
            raise ConfigError(
                f"--resume: the checkpoint is at step {done}, past train.iterations = "
                f"{config.train.iterations}; pass --iterations {done} or more"
            )


def output_dir(run_dir: Path, cluster, log) -> Path:
    """Where this process writes: the run directory on the chief, a temporary folder on other workers."""
    if cluster.is_chief:
        return run_dir
    out_dir = Path(tempfile.mkdtemp(prefix=f"msdn-{cluster.task_type}{cluster.index}-"))
    log(
        f"msdn-tf: {cluster.task_type}[{cluster.index}] of {cluster.num_workers}: not the chief, "
        f"writing to the temporary {out_dir} (removed at the end)"
    )
    return out_dir


def run_training(
    config: Config, run_dir=None, resume: bool = False, data=None, log=print, eval_hooks=(), resume_changes=None
) -> dict:
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
    config, precision, cluster, run_dir, checkpointer = prepare_run(config, run_dir, resume)
    strategy = make_strategy(config)  # a bad train.strategy or TF_CONFIG fails before anything is written
    out_dir = output_dir(run_dir, cluster, log)
    try:
        session = TrainingSession(
            config=config,
            run_dir=run_dir,
            out_dir=out_dir,
            checkpointer=checkpointer,
            precision=precision,
            cluster=cluster,
            strategy=strategy,
            log=log,
            eval_hooks=tuple(eval_hooks),
        )
        session.setup(data)
        session.restore_or_start(resume, resume_changes)
        session.train()
        return session.finish()
    finally:
        if out_dir != run_dir:
            shutil.rmtree(out_dir, ignore_errors=True)


@dataclasses.dataclass
class TrainingSession:
    """The state of one training session of a run, and its steps (each one method).

    Writes go to ``out_dir`` (the run directory on the chief); restores come from
    ``checkpointer`` (the run directory's). :func:`run_training` is the way to use it.
    """

    config: Config
    run_dir: Path
    out_dir: Path
    checkpointer: Checkpointer
    precision: Any
    cluster: Any
    strategy: Any
    log: Callable = print
    eval_hooks: tuple = ()
    data: Any = None
    model: Any = None
    sampler: Any = None
    iterations: int = 0
    eval_every: int = 1
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    resumes: list = dataclasses.field(default_factory=list)
    loop: Any = None  # the multi-worker step loop (train.strategy=multi_worker), else None
    device_store: Any = None  # training rows held in TensorFlow memory, else None
    writer: Any = None  # the TensorBoard writer of out_dir/tensorboard
    started: float = 0.0

    @property
    def multi_worker(self) -> bool:
        return self.config.train.strategy == "multi_worker"

    def setup(self, data=None) -> None:
        """Write ``config.yaml``, seed, load the data, build the model and the batch sampler."""
        from msdn_tf.data.pipeline import make_sampler
        from msdn_tf.data.registry import load_dataset

        config, log = self.config, self.log
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.out_dir / "config.yaml")
        log(f"msdn-tf: precision {self.precision.policy} ({self.precision.reason})")
        set_seeds(config)
        self.data = data if data is not None else load_dataset(config)
        self.iterations, self.eval_every = schedule(config, len(self.data.trainval_loc))
        with strategy_scope(self.strategy):  # variables (model and optimizer) mirrored over the replicas
            self.model = build_model_from_config(config, self.data)
        if self.multi_worker:
            from msdn_tf.training.multi_worker import MultiWorkerLoop

            self.loop = MultiWorkerLoop(self.model, self.strategy)
        self.sampler = make_sampler(self.data, config.data.sampler, config.data.batch_size, config.train.seed)
        log(f"msdn-tf: {json.dumps(self.data.summary())}")
        log(f"msdn-tf: {self.iterations} iterations, evaluation every {self.eval_every}, run dir {self.run_dir}")
        if config.train.tensorboard_images:
            from msdn_tf.viz.tensorboard import make_eval_hooks

            self.eval_hooks = tuple(self.eval_hooks) + tuple(make_eval_hooks(config, self.data))

    def restore_or_start(self, resume: bool, resume_changes=None) -> None:
        """Continue from the checkpoint (``resume``), or evaluate the untrained model (``train.eval_initial``)."""
        if resume:
            self._restore(resume_changes)
        elif self.config.train.eval_initial:
            from msdn_tf.evaluation.predict import evaluate_model

            initial = evaluate_model(self.model, self.data, self.config.data.eval_batch_size)
            self.history.append(metric_entry(0, initial))

    def _restore(self, resume_changes) -> None:
        with strategy_scope(self.strategy):
            state = self.checkpointer.restore(self.model)
        self.history, self.step = state["history"], int(state["step"])
        self.resumes = list(state.get("resumes", []))
        if self.step > self.iterations:
            raise ConfigError(
                f"--resume: the checkpoint is at step {self.step}, past train.iterations = "
                f"{self.iterations}; pass --iterations {self.step} or more"
            )
        if resume_changes:
            self.resumes.append({"step": self.step, "changes": resume_changes})
        self.log(
            f"msdn-tf: resumed at step {self.step}"
            + (
                f" with {', '.join(f'{k}: {a} -> {b}' for k, (a, b) in resume_changes.items())}"
                if resume_changes
                else ""
            )
        )
        purged = purge_events_after(tensorboard_dir(self.run_dir), self.step) if self.cluster.is_chief else 0
        if purged:
            self.log(
                f"msdn-tf: removed {purged} TensorBoard events past step {self.step} (written before the interruption)"
            )

    def _device_store(self):
        """The training rows in TensorFlow memory when ``data.on_device`` asks for it (TensorFlow only)."""
        from msdn_tf.data.device import DeviceFeatures, use_on_device

        if not on_tensorflow():
            if self.config.data.on_device is not False:
                self.log(
                    f"msdn-tf: data.on_device={self.config.data.on_device} holds rows in TensorFlow memory, "
                    f"which only the TensorFlow backend can use; on {current_backend()} batches come from "
                    "the host pipeline"
                )
            return None
        if not use_on_device(self.config.data.on_device, self.data):
            return None
        store = DeviceFeatures(self.data.features, self.data.trainval_loc)
        self.log(f"msdn-tf: training features on device ({store.nbytes / 1e6:.0f} MB, {store.dtype})")
        return store

    def train(self) -> None:
        """Train up to each evaluation step (:func:`evaluation_steps`), then evaluate and checkpoint."""
        import tensorflow as tf

        from msdn_tf.training.nonfinite import NonFiniteGuard
        from msdn_tf.training.reporting import TensorBoardLosses

        config = self.config
        self.device_store = self._device_store()
        self.writer = tf.summary.create_file_writer(str(tensorboard_dir(self.out_dir)))
        if self.step == 0:  # a new run (a resumed one logged these in its first session)
            write_hparams(self.writer, config, Path(self.run_dir).name)
            for entry in self.history:  # the untrained model's evaluation (train.eval_initial)
                write_eval_summaries(self.writer, entry["step"], entry, {})
        verbose = config.train.verbose if config.train.verbose >= 0 else (1 if sys.stdout.isatty() else 2)
        log_cb = TensorBoardLosses(self.writer, config.train.log_every)
        guard = NonFiniteGuard()
        self.model.check_numerics = config.train.check_numerics
        self.started = time.time()
        points = evaluation_steps(self.iterations, self.eval_every, config.train.eval_offset)
        for end in [p for p in points if p > self.step]:
            steps = end - self.step
            if verbose:
                self.log(f"period {points.index(end) + 1}/{len(points)}: steps {self.step + 1}-{end}")
            log_cb.offset = guard.offset = self.step
            logs = self.train_period(steps, [guard, log_cb], verbose)
            self._stop_if_nonfinite(guard)
            self.step += steps
            self.evaluate({k: v for k, v in logs.items() if k != "nonfinite"})
            self.save_checkpoint()

    def _batches(self, steps: int):
        """A function ``make(shard=None)`` of the next ``steps`` training batches (host or device rows)."""
        from msdn_tf.data.device import device_train_dataset
        from msdn_tf.data.pipeline import train_dataset

        prefetch = self.config.data.prefetch
        if self.device_store is not None:
            return functools.partial(
                device_train_dataset, self.device_store, self.data.labels, self.sampler, self.step, steps, prefetch
            )
        return functools.partial(train_dataset, self.data, self.sampler, self.step, steps, prefetch)

    def train_period(self, steps: int, callbacks, verbose) -> dict:
        """Train ``steps`` steps (``fit``, or the multi-worker loop); the period's running-mean logs."""
        make = self._batches(steps)
        if not self.multi_worker:
            fit = self.model.fit(make(), epochs=1, verbose=verbose, callbacks=callbacks, shuffle=False)
            return {k: v[-1] for k, v in fit.history.items()}
        import tensorflow as tf

        from msdn_tf.training.multi_worker import worker_shard

        replicas = self.strategy.num_replicas_in_sync
        dataset = self.strategy.distribute_datasets_from_function(lambda ctx: make(shard=worker_shard(ctx, replicas)))
        try:
            return self.loop.run(dataset, steps, callbacks)
        except (tf.errors.OpError, RuntimeError) as exc:
            last = (
                f"from the checkpoint of step {self.step}"
                if self.checkpointer.exists() or self.step
                else "from the start"
            )
            raise MSDNError(
                f"{self.cluster.task_type}[{self.cluster.index}]: training across the TF_CONFIG cluster stopped in "
                f"steps {self.step + 1}-{self.step + steps} (a worker stopped or is unreachable). Restart EVERY "
                f"worker with: python -m msdn_tf.train --run-dir {self.run_dir} --resume (continues {last}). "
                f"TensorFlow said: {str(exc).splitlines()[0][:300]}"
            ) from exc

    def _stop_if_nonfinite(self, guard) -> None:
        if guard.failure is not None:
            from msdn_tf.training.nonfinite import nonfinite_message

            self.writer.flush()
            raise NonFiniteError(nonfinite_message(guard, self.data, self.sampler, self.checkpointer, self.strategy))

    def evaluate(self, losses: dict) -> None:
        """Evaluate after a period: the history entry, TensorBoard, the evaluation hooks, one progress line."""
        from msdn_tf.evaluation.predict import evaluate_model

        try:
            metrics = evaluate_model(
                self.model, self.data, self.config.data.eval_batch_size, return_logits=bool(self.eval_hooks)
            )
        except NonFiniteError as exc:
            raise NonFiniteError(
                f"evaluation after step {self.step}: {exc}. {checkpoint_note(self.checkpointer)}"
            ) from exc
        entry = metric_entry(self.step, metrics, losses)
        self.history.append(entry)
        write_eval_summaries(self.writer, self.step, entry, losses)
        for hook in self.eval_hooks:
            hook(model=self.model, data=self.data, step=self.step, metrics=metrics, writer=self.writer)
        self.writer.flush()
        self.log(
            f"step {self.step}: CZSL acc {pct(entry['acc']):.2f}  U {pct(entry['U']):.2f}  "
            f"S {pct(entry['S']):.2f}  H {pct(entry['H']):.2f}  loss {losses.get('loss', float('nan')):.4f}"
        )

    def save_checkpoint(self) -> None:
        """Checkpoint into ``out_dir``; a full disk is one clear error naming the intact checkpoint."""
        try:
            Checkpointer(self.out_dir).save(self.model, self.step, self.history, self.resumes)
        except OSError as exc:
            then = (
                f"; once there is room, continue with python -m msdn_tf.train --run-dir {self.run_dir} --resume"
                if self.checkpointer.exists()
                else ""
            )
            raise MSDNError(
                f"saving the checkpoint of step {self.step}: {describe_os_error(exc)} "
                f"{checkpoint_note(self.checkpointer)}{then}"
            ) from exc

    def finish(self) -> dict:
        """Save ``model.keras``, write ``results.json`` and ``results.md``; the results."""
        try:
            with atomic_path(self.out_dir / "model.keras") as tmp:
                self.model.save(tmp)
        except OSError as exc:
            raise MSDNError(
                f"saving the trained model: {describe_os_error(exc)} {checkpoint_note(self.checkpointer)}; "
                f"once there is room, python -m msdn_tf.train --run-dir {self.run_dir} --resume "
                "writes the model and results from it"
            ) from exc
        results = build_results(
            self.config,
            self.run_dir,
            self.data,
            self.iterations,
            self.history,
            self.resumes,
            self.precision,
            self.cluster,
            self.strategy,
            time.time() - self.started,
            current_backend(),
        )
        self.log(write_results(self.out_dir, results))
        if self.writer is not None:
            write_final_summaries(self.writer, results)
        return results
