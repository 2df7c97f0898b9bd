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
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from msdn_tf.backend import current as current_backend
from msdn_tf.backend import on_tensorflow
from msdn_tf.config import Config, load_yaml, resolve_config, save_config, from_dict
from msdn_tf.errors import ConfigError, MSDNError
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
    """An initialised, compiled :class:`~msdn_tf.model.MSDN` for ``data`` as ``config`` says."""
    from msdn_tf.model import build_msdn
    from msdn_tf.optimizers import TorchRMSprop

    model = build_msdn(
        data.att, data.w2v, data.seen_classes, data.unseen_classes,
        feature_dim=data.feature_dim, num_regions=data.num_regions,
        normalize_attribute_vectors=config.model.normalize_attribute_vectors,
        fusion_weights=config.model.fusion_weights, branches=config.model.branches,
        attention=config.model.attention, bias=config.model.bias,
        lambda_cal=config.loss.lambda_cal, distill_weight=config.loss.distill_weight,
        cross_entropy=config.loss.cross_entropy, calibration=config.loss.calibration,
        distillation=config.loss.distillation, seed=config.train.seed,
    )
    opt = config.optimizer
    model.compile(
        optimizer=TorchRMSprop(learning_rate=opt.learning_rate, rho=opt.rho, epsilon=opt.epsilon,
                               momentum=opt.momentum, coupled_weight_decay=opt.weight_decay),
        # train.jit_compile chooses XLA on TensorFlow; on JAX every step is jax.jit-compiled (XLA).
        jit_compile=config.train.jit_compile or not on_tensorflow(),
    )
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

    def save(self, model, step: int, history: list) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = f"step_{step:08d}"
        with atomic_path(self.dir / f"{stem}.weights.h5") as tmp:
            model.save_weights(tmp)
        with atomic_path(self.dir / f"{stem}.optimizer.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, *[np.asarray(v) for v in model.optimizer.variables])
        write_json(self.state_path, {"step": step, "weights": f"{stem}.weights.h5",
                                     "optimizer": f"{stem}.optimizer.npz", "history": history})
        for old in self.dir.glob("step_*"):
            if not old.name.startswith(stem):
                old.unlink()

    def restore(self, model) -> dict:
        with open(self.state_path) as f:
            state = json.load(f)
        model.load_weights(self.dir / state["weights"])
        model.optimizer.build(model.trainable_variables)
        with np.load(self.dir / state["optimizer"]) as saved:
            values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        variables = model.optimizer.variables
        if len(values) != len(variables):
            raise MSDNError(
                f"{self.dir / state['optimizer']}: holds {len(values)} optimizer variables, "
                f"the model's optimizer has {len(variables)}"
            )
        for var, value in zip(variables, values):
            var.assign(value)
        return state


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
        strategy = get_strategy(name)
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
                 eval_hooks=()) -> dict:
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

    Returns:
        The content of ``results.json``.
    """
    import tensorflow as tf

    from msdn_tf.data.pipeline import make_sampler, train_dataset
    from msdn_tf.data.registry import load_dataset
    from msdn_tf.evaluation.predict import evaluate_model

    run_dir = Path(run_dir) if run_dir else default_run_dir(config)
    checkpointer = Checkpointer(run_dir)
    if checkpointer.exists() and not resume:
        raise MSDNError(f"{run_dir} already holds a checkpoint; pass --resume to continue it, "
                        "or choose another --run-dir")
    if resume and not checkpointer.exists():
        raise MSDNError(f"--resume: no checkpoint in {run_dir / 'checkpoint'}")
    strategy = _strategy(config)  # a bad train.strategy fails before the run directory is made
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")

    set_seeds(config)
    data = data if data is not None else load_dataset(config)
    iterations, eval_every = schedule(config, len(data.trainval_loc))
    with _scope(strategy):  # variables (model and optimizer) mirrored over the replicas
        model = build_model_from_config(config, data)
    sampler = make_sampler(data, config.data.sampler, config.data.batch_size, config.train.seed)
    log(f"msdn-tf: {json.dumps(data.summary())}")
    log(f"msdn-tf: {iterations} iterations, evaluation every {eval_every}, run dir {run_dir}")

    history, step = [], 0
    if resume:
        with _scope(strategy):
            state = checkpointer.restore(model)
        history, step = state["history"], int(state["step"])
        log(f"msdn-tf: resumed at step {step}")
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

    writer = tf.summary.create_file_writer(str(run_dir / "tensorboard"))
    verbose = config.train.verbose if config.train.verbose >= 0 else (1 if sys.stdout.isatty() else 2)
    log_cb = _TensorBoardLosses(writer, config.train.log_every)
    started = time.time()
    n_periods = math.ceil(iterations / eval_every)
    while step < iterations:
        steps = min(eval_every, iterations - step)
        period = step // eval_every + 1
        if verbose:
            log(f"period {period}/{n_periods}: steps {step + 1}-{step + steps}")
        log_cb.offset = step
        if device_store is not None:
            dataset = device_train_dataset(device_store, data.labels, sampler, step, steps, config.data.prefetch)
        else:
            dataset = train_dataset(data, sampler, step, steps, config.data.prefetch)
        fit = model.fit(dataset, epochs=1,
                        verbose=verbose, callbacks=[log_cb], shuffle=False)
        step += steps
        losses = {k: v[-1] for k, v in fit.history.items()}
        metrics = evaluate_model(model, data, config.data.eval_batch_size, return_logits=bool(eval_hooks))
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
        checkpointer.save(model, step, history)
        log(f"step {step}: CZSL acc {_pct(entry['acc']):.2f}  U {_pct(entry['U']):.2f}  "
            f"S {_pct(entry['S']):.2f}  H {_pct(entry['H']):.2f}  loss {losses.get('loss', float('nan')):.4f}")

    with atomic_path(run_dir / "model.keras") as tmp:
        model.save(tmp)
    results = {
        "dataset": config.data.dataset,
        "run_dir": str(run_dir),
        "data": data.summary(),
        "iterations": iterations,
        "seed": config.train.seed,
        "backend": current_backend(),
        "train_seconds_this_session": round(time.time() - started, 2),
        "initial": history[0] if history and history[0]["step"] == 0 else None,
        "final": history[-1],
        "best_on_test": {"note": best_note(data.name), "best_H": _best(history, "H"), "best_acc": _best(history, "acc")},
        "history": history,
    }
    write_json(run_dir / "results.json", results)
    table = results_table(results)
    from msdn_tf.utils import atomic_write_text

    atomic_write_text(run_dir / "results.md", f"# {config.data.dataset} (seed {config.train.seed})\n\n{table}\n")
    log(table)
    return results


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
                            tf.summary.scalar(f"train/{key}", float(value))

        return Callback()


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
    p.add_argument("--strategy", choices=["none", "mirrored", "multi_worker"],
                   help="shortcut for --set train.strategy=NAME (tf.distribute; multi_worker reads TF_CONFIG)")
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
    return resolve_config(args.dataset or "demo", args.config, overrides)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.resume:
            if not args.run_dir:
                raise ConfigError("--resume needs --run-dir")
            path = Path(args.run_dir) / "config.yaml"
            config = from_dict(load_yaml(path), str(path))
        else:
            config = config_from_args(args)
        if args.print_config:
            from msdn_tf.config import to_yaml

            print(to_yaml(config))
            return 0
        from msdn_tf.data.registry import get_spec

        get_spec(config.data.dataset)  # fail fast on an unknown name, before TensorFlow starts
        results = run_training(config, run_dir=args.run_dir, resume=args.resume)
    except MSDNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
