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

import contextlib
import copy
import dataclasses
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

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
from msdn_tf.training.resume import RUN_FILES, RUN_FOLDERS, check_run_dir, data_problem, resume_point
from msdn_tf.utils import atomic_path
from msdn_tf.zeroshot import SEMANTICS_FILE, write_class_semantics

if TYPE_CHECKING:  # the types of TrainingSession's fields
    import tensorflow as tf

    from msdn_tf.data.base import ZSLData
    from msdn_tf.data.device import DeviceFeatures
    from msdn_tf.data.pipeline import Sampler
    from msdn_tf.distribute import ClusterInfo
    from msdn_tf.model import MSDN
    from msdn_tf.precision import Precision
    from msdn_tf.training.multi_worker import MultiWorkerLoop
    from msdn_tf.training.nonfinite import NonFiniteGuard


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
    from msdn_tf.distribute import get_strategy
    from msdn_tf.options import STRATEGIES

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


def prepare_run(config: Config, run_dir, resume: bool, overwrite: bool = False) -> tuple:
    """``(config, precision, cluster, run_dir)`` after every check that precedes a write.

    The precision is resolved (``auto`` -> the policy used, recorded in the returned
    config copy), TF_CONFIG is read, and the run directory is checked
    (:func:`~msdn_tf.training.resume.check_run_dir`): a file where the folder should be,
    ``--resume`` without a checkpoint, a checkpoint or a model without ``--resume`` or
    ``--overwrite`` is refused here. Nothing is written.
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
    check_run_dir(run_dir, resume, overwrite, cluster)
    return config, precision, cluster, run_dir


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


class TrainingInterrupted(MSDNError):
    """Ctrl-C (SIGINT) during training; the message says which checkpoint is intact. Exit status 130."""

    exit_code = 130


def run_training(
    config: Config,
    run_dir=None,
    resume: bool = False,
    data=None,
    log=print,
    eval_hooks=(),
    resume_changes=None,
    overwrite: bool = False,
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
        overwrite: replace a run already in ``run_dir`` (its model, checkpoint, results and
            TensorBoard events are removed once the data and the model are ready).

    The run directory has one writer at a time (:class:`~msdn_tf.runlock.RunLock`).
    A run that fails before its first checkpoint leaves nothing behind (no
    ``config.yaml``, no TensorBoard events); ``config.yaml`` is written with the first
    checkpoint.

    Returns:
        The content of ``results.json``.

    Raises:
        NonFiniteError: a NaN or inf appeared (input features, a loss term, the
            gradients, the weights or the evaluation outputs); the message names the
            step and what went non-finite. The last checkpoint stays as it was and
            neither ``model.keras`` nor ``results.json`` is written.
        TrainingInterrupted: Ctrl-C; the message names the step reached and the intact
            checkpoint (exit status 130 in the commands).
    """
    from msdn_tf.runlock import RunLock

    config, precision, cluster, run_dir = prepare_run(config, run_dir, resume, overwrite)
    strategy = make_strategy(config)  # a bad train.strategy or TF_CONFIG fails before anything is written
    command = "train --resume" if resume else ("train --overwrite" if overwrite else "train")
    lock = RunLock(run_dir, command, log) if cluster.is_chief else contextlib.nullcontext()
    with lock:
        return _run_locked(
            config, run_dir, resume, overwrite, precision, cluster, strategy, data, log, eval_hooks, resume_changes
        )


def _run_locked(
    config, run_dir, resume, overwrite, precision, cluster, strategy, data, log, eval_hooks, resume_changes
):
    """:func:`run_training` once the lock is held."""
    check_run_dir(run_dir, resume, overwrite, cluster)  # again, under the lock
    out_dir = output_dir(run_dir, cluster, log)
    session = None
    try:
        session = TrainingSession.build(
            config,
            run_dir=run_dir,
            out_dir=out_dir,
            precision=precision,
            cluster=cluster,
            strategy=strategy,
            data=data,
            log=log,
            eval_hooks=tuple(eval_hooks),
            resume=resume,
            resume_changes=resume_changes,
            overwrite=overwrite,
        )
        session.train()
        return session.finish()
    except KeyboardInterrupt as exc:
        if session is not None:
            session.discard_unfinished()
        raise TrainingInterrupted(interrupted_message(session, run_dir, resume)) from exc
    except BaseException:
        if session is not None:
            session.discard_unfinished()
        raise
    finally:
        if out_dir != run_dir:
            shutil.rmtree(out_dir, ignore_errors=True)


def device_store_for(config: Config, data, log, model, sampler, iterations: int, eval_every: int):
    """The training rows on the device when ``data.on_device`` asks for it.

    TensorFlow: a :class:`~msdn_tf.data.device.DeviceFeatures` feeding ``fit``. JAX: a
    :class:`~msdn_tf.training.jax_loop.DeviceLoop`, which also runs the periods.
    """
    from msdn_tf.data.device import DeviceFeatures, use_on_device

    if not use_on_device(config.data.on_device, data):
        return None
    if not on_tensorflow():
        from msdn_tf.training.jax_loop import DeviceLoop

        points = [0] + evaluation_steps(iterations, eval_every, config.train.eval_offset)
        longest = max(b - a for a, b in zip(points, points[1:]))
        store = DeviceLoop(model, data, sampler, longest)
        log(
            f"msdn-tf: training features on device ({store.nbytes / 1e6:.0f} MB, {store.dtype}); "
            f"up to {store.max_steps} steps per dispatch"
        )
        return store
    store = DeviceFeatures(data.features, data.trainval_loc)
    log(f"msdn-tf: training features on device ({store.nbytes / 1e6:.0f} MB, {store.dtype})")
    return store


def input_error(exc, data, where: str, checkpointer=None) -> MSDNError:
    """One line for an error TensorFlow or h5py raised while reading the data (a corrupt chunk, a bad row)."""
    import re

    from msdn_tf.data.base import feature_file

    text = str(getattr(exc, "message", None) or exc).strip()
    # the Python error raised inside tf.data is the last "SomeError: ..." line of TensorFlow's report
    raised = [m.group(1) for m in re.finditer(r"^\s*((?:[\w.]+Error|[\w.]+Exception): .*\S)\s*$", text, re.M)]
    first = raised[-1] if raised else next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    first = first[:300]
    note = f" {checkpoint_note(checkpointer)}." if checkpointer is not None else ""
    return MSDNError(
        f"{where}: reading {feature_file(data.features, data.source)} failed ({first}); "
        f"the file may be corrupt or hold values that are not numbers: check it (or write it again).{note}"
    )


def clear_run(run_dir: Path, log, overwrite: bool) -> None:
    """Before a new run writes: remove the old run (``overwrite``), or what a killed run left without a checkpoint."""
    from msdn_tf.training.convert import BACKBONE_FILE, REPORT_FILE

    files = [n for n in (*RUN_FILES, REPORT_FILE, BACKBONE_FILE) if (run_dir / n).exists()]
    files += sorted(p.name for p in run_dir.glob("events.out.tfevents.*"))  # reporting.tensorboard_dir
    folders = [n for n in RUN_FOLDERS if (run_dir / n).exists()]
    if not files and not folders:
        return
    if not overwrite:  # check_run_dir let it through: no model, no checkpoint: a run that never got that far
        files = [n for n in files if n in ("config.yaml", "results.json", "results.md") or n.startswith("events.")]
        folders = [n for n in folders if n == "tensorboard"]
        if not files and not folders:
            return
    for name in files:
        (run_dir / name).unlink()
    for name in folders:
        shutil.rmtree(run_dir / name)
    why = "--overwrite" if overwrite else "left by a run that stopped before its first checkpoint"
    log(f"msdn-tf: removed {', '.join(files + [f + '/' for f in folders])} from {run_dir} ({why})")


def interrupted_message(session, run_dir: Path, resume: bool) -> str:
    """The one line of a Ctrl-C: the step reached, the intact checkpoint, how to continue."""
    checkpointer = Checkpointer(run_dir)
    reached = session.reached if session is not None else 0
    head = f"interrupted at step {reached}" if session is not None else "interrupted before training started"
    if checkpointer.exists():
        step = json.loads(checkpointer.state_path.read_text())["step"]
        return (
            f"{head}; the checkpoint of step {step} in {checkpointer.dir} is intact; resume with "
            f"python -m msdn_tf.train --run-dir {run_dir} --resume"
        )
    return f"{head}; no checkpoint had been written, so nothing of this run was kept; start it again"


@dataclasses.dataclass
class TrainingSession:
    """One training session of a run: everything it needs, set when it is built, and its steps.

    Build it with :meth:`build` (:func:`run_training` does). Writes go to ``out_dir`` (the
    run directory on the chief); restores come from ``checkpointer`` (the run
    directory's). The only fields that change are the progress: ``step``,
    ``history`` and ``resumes``.
    """

    config: Config
    run_dir: Path
    out_dir: Path
    checkpointer: Checkpointer
    precision: "Precision"
    cluster: "ClusterInfo"
    strategy: Optional["tf.distribute.Strategy"]  # None on JAX
    data: "ZSLData"
    model: "MSDN"
    sampler: "Sampler"
    iterations: int
    eval_every: int
    step: int
    history: list
    resumes: list
    problem: dict  # what --resume compares the data with (resume.data_problem)
    loop: Optional["MultiWorkerLoop"]  # the multi-worker step loop (train.strategy=multi_worker)
    device_store: Optional["DeviceFeatures"]  # training rows on the device (TensorFlow memory, or a JAX DeviceLoop)
    writer: "tf.summary.SummaryWriter"  # the TensorBoard writer of out_dir/tensorboard
    guard: "NonFiniteGuard"  # the callback that stops at the first non-finite step
    started: float
    fresh: bool  # a new run (not a resume): what it wrote is removed if it fails before a checkpoint
    eval_hooks: tuple = ()
    log: Callable = print

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        run_dir: Path,
        out_dir: Path,
        precision,
        cluster,
        strategy,
        data=None,
        log=print,
        eval_hooks=(),
        resume: bool = False,
        resume_changes=None,
        overwrite: bool = False,
    ) -> "TrainingSession":
        """Seed, load the data, build the model and sampler, find the start point; then (last) write.

        Every check runs before the first write: a refused resume or bad data leave the
        run directory as it was. The writes are: the old run's files removed (``overwrite``),
        the checkpoint restored, TensorBoard events past it purged, the TensorBoard writer.
        """
        import tensorflow as tf

        from msdn_tf.data.pipeline import make_sampler
        from msdn_tf.data.registry import load_dataset
        from msdn_tf.training.nonfinite import NonFiniteGuard

        log(f"msdn-tf: precision {precision.policy} ({precision.reason})")
        set_seeds(config)
        data = data if data is not None else load_dataset(config)
        iterations, eval_every = schedule(config, len(data.trainval_loc))
        checkpointer = Checkpointer(run_dir)
        start = resume_point(checkpointer, resume, iterations, data, resume_changes)
        with strategy_scope(strategy):  # variables (model and optimizer) mirrored over the replicas
            model = build_model_from_config(config, data)
        loop = None
        if config.train.strategy == "multi_worker":
            from msdn_tf.training.multi_worker import MultiWorkerLoop

            loop = MultiWorkerLoop(model, strategy)
        sampler = make_sampler(data, config.data.sampler, config.data.batch_size, config.train.seed)
        if config.train.tensorboard_images:
            from msdn_tf.viz.tensorboard import make_eval_hooks

            eval_hooks = tuple(eval_hooks) + tuple(make_eval_hooks(config, data))
        if resume:
            with strategy_scope(strategy):
                checkpointer.restore(model)
        # everything is checked: from here on the run directory is written
        if cluster.is_chief and not resume:
            clear_run(run_dir, log, overwrite)
        out_dir.mkdir(parents=True, exist_ok=True)
        log(f"msdn-tf: {json.dumps(data.summary())}")
        log(f"msdn-tf: {iterations} iterations, evaluation every {eval_every}, run dir {run_dir}")
        if resume:
            log(
                f"msdn-tf: resumed at step {start.step}"
                + (
                    f" with {', '.join(f'{k}: {a} -> {b}' for k, (a, b) in resume_changes.items())}"
                    if resume_changes
                    else ""
                )
            )
            purged = purge_events_after(tensorboard_dir(run_dir), start.step) if cluster.is_chief else 0
            if purged:
                what = f"{purged} TensorBoard events past step {start.step}"
                log(f"msdn-tf: removed {what} (written before the interruption)")
        session = cls(
            config=config,
            run_dir=run_dir,
            out_dir=out_dir,
            checkpointer=checkpointer,
            precision=precision,
            cluster=cluster,
            strategy=strategy,
            data=data,
            model=model,
            sampler=sampler,
            iterations=iterations,
            eval_every=eval_every,
            step=start.step,
            history=start.history,
            resumes=start.resumes,
            problem=data_problem(data),
            loop=loop,
            device_store=device_store_for(config, data, log, model, sampler, iterations, eval_every),
            writer=tf.summary.create_file_writer(str(tensorboard_dir(out_dir))),
            guard=NonFiniteGuard(),
            started=time.time(),
            fresh=not resume,
            eval_hooks=tuple(eval_hooks),
            log=log,
        )
        if not resume and config.train.eval_initial:
            from msdn_tf.evaluation.predict import evaluate_model

            initial = evaluate_model(model, data, config.data.eval_batch_size)
            session.history.append(metric_entry(0, initial))
        return session

    @property
    def reached(self) -> int:
        """The last training step finished (within a period, as the step callback saw it)."""
        return max(self.step, int(getattr(self.guard, "done", 0) or 0))

    def discard_unfinished(self) -> None:
        """After a failure: a new run that wrote no checkpoint leaves nothing (no events, no config)."""
        with contextlib.suppress(Exception):
            self.writer.close()
        if self.fresh and self.cluster.is_chief and not Checkpointer(self.out_dir).exists():
            shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)
            for events in self.out_dir.glob("events.out.tfevents.*"):  # tensorboard_dir: the run dir itself
                events.unlink(missing_ok=True)
            for name in ("config.yaml", "results.json", "results.md", SEMANTICS_FILE):
                (self.out_dir / name).unlink(missing_ok=True)

    @property
    def multi_worker(self) -> bool:
        return self.config.train.strategy == "multi_worker"

    def train(self) -> None:
        """Train up to each evaluation step (:func:`evaluation_steps`), then evaluate and checkpoint."""
        from msdn_tf.training.reporting import TensorBoardLosses

        config = self.config
        if self.step == 0:  # a new run (a resumed one logged these in its first session)
            write_hparams(self.writer, config, Path(self.run_dir).name)
            for entry in self.history:  # the untrained model's evaluation (train.eval_initial)
                write_eval_summaries(self.writer, entry["step"], entry, {})
        verbose = config.train.verbose if config.train.verbose >= 0 else (1 if sys.stdout.isatty() else 2)
        log_cb = TensorBoardLosses(self.writer, config.train.log_every)
        guard = self.guard
        self.model.check_numerics = config.train.check_numerics
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
        """Train ``steps`` steps (``fit``, the multi-worker loop or JAX's on-device loop); the running-mean logs."""
        if self.device_store is not None and not on_tensorflow():  # JAX: the period in one dispatch
            return self.device_store.train(self.step, steps, callbacks, log=self.log if verbose else None)
        import tensorflow as tf

        make = self._batches(steps)
        if not self.multi_worker:
            try:
                fit = self.model.fit(make(), epochs=1, verbose=verbose, callbacks=callbacks, shuffle=False)
            except tf.errors.OpError as exc:
                raise input_error(exc, self.data, f"training steps {self.step + 1}-{self.step + steps}") from exc
            return {k: v[-1] for k, v in fit.history.items()}

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
        except Exception as exc:
            import tensorflow as tf

            if isinstance(exc, (tf.errors.OpError, OSError)) and not isinstance(exc, MSDNError):
                raise input_error(exc, self.data, f"evaluation after step {self.step}", self.checkpointer) from exc
            raise
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
            save_config(self.config, self.out_dir / "config.yaml")  # before state.json: a checkpoint always has it
            # what re-targeting to new classes needs (msdn_tf.zeroshot): the row rule, attribute and class names
            write_class_semantics(self.out_dir, self.data, self.config)
            Checkpointer(self.out_dir).save(self.model, self.step, self.history, self.resumes, self.problem)
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
