"""What a training run reports: ``results.json``, ``results.md``, the summary line and TensorBoard.

* :func:`build_results` / :func:`write_results`: the content of ``results.json`` and the
  Markdown table of ``results.md`` (:func:`results_table`);
* :func:`summary_line`: the one JSON line ``python -m msdn_tf.train`` prints last;
* :class:`TensorBoardLosses`, :func:`write_eval_summaries`: the TensorBoard scalars of
  training (``train/*``) and of every evaluation (``eval/*``, ``period/*``);
* :func:`purge_events_after`: drop TensorBoard events an interrupted session wrote past
  the checkpoint a resumed run continues from.
"""

from __future__ import annotations

import json
from pathlib import Path

from msdn_tf.utils import atomic_path, atomic_write_text, markdown_table, write_json

METRICS = ("acc", "U", "S", "H")
BEST_NOTE = (
    "selected on the TEST split over all evaluations during training, as the reference "
    "implementation does; not an unbiased estimate"
)
VALIDATION_NOTE = (
    "selected over all evaluations during training on this run's held-out split, which is a "
    "VALIDATION split (the test split is not used by this run)"
)


def best_note(dataset_name: str) -> str:
    """What the best-during-training figures were selected on, for a dataset (view) name."""
    return VALIDATION_NOTE if dataset_name.endswith("-validation") else BEST_NOTE


def pct(x) -> float:
    """A fraction as a percentage."""
    return 100.0 * float(x)


def results_table(results: dict) -> str:
    """The Markdown table of ``results.md``: the final and the best-during-training figures."""
    rows = []
    final = results["final"]
    rows.append(
        ["final (last step)", final["step"], pct(final["acc"]), pct(final["U"]), pct(final["S"]), pct(final["H"])]
    )
    for key, label in (("best_H", "best H during training*"), ("best_acc", "best CZSL acc during training*")):
        entry = results["best_on_test"][key]
        if entry is not None:
            rows.append([label, entry["step"], pct(entry["acc"]), pct(entry["U"]), pct(entry["S"]), pct(entry["H"])])
    table = markdown_table(["selection", "step", "CZSL acc %", "GZSL U %", "GZSL S %", "GZSL H %"], rows)
    return f"{table}\n\n* {results['best_on_test']['note']}."


def metric_entry(step, metrics, losses=None) -> dict:
    """One ``history`` entry: the step, CZSL acc and U/S/H, each sub-net's, and the period's loss terms."""
    entry = {"step": int(step), **{k: float(metrics[k]) for k in ("acc", "U", "S", "H")}}
    entry["a2v"] = {k: float(v) for k, v in metrics["a2v"].items()}
    entry["v2a"] = {k: float(v) for k, v in metrics["v2a"].items()}
    if losses:
        entry["losses"] = {k: float(v) for k, v in losses.items()}
    return entry


def best_entry(history, key):
    """The ``history`` entry with the highest ``key`` after step 0 (the earliest of ties), or None."""
    candidates = [h for h in history if h["step"] > 0]
    return max(candidates, key=lambda h: (h[key], -h["step"])) if candidates else None


def build_results(
    config,
    run_dir,
    data,
    iterations,
    history,
    resumes,
    precision,
    cluster,
    strategy,
    train_seconds: float,
    backend: str,
) -> dict:
    """The content of ``results.json`` of a finished run.

    Args:
        config: the run's resolved config; ``run_dir``: its folder; ``data``: its ZSLData.
        iterations: the steps trained; ``history``: the :func:`metric_entry` of every evaluation;
        resumes: the record of ``--resume`` changes; ``precision``: the resolved precision;
        cluster: the TF_CONFIG cluster info; ``strategy``: the tf.distribute strategy (None on JAX);
        train_seconds: training time of this session; ``backend``: the Keras backend name.

    Example:
        >>> results = build_results(config, run_dir, data, 100, history, [], precision, cluster, None, 12.5, "jax")
    """
    return {
        "dataset": config.data.dataset,
        "run_dir": str(run_dir),
        "data": data.summary(),
        "iterations": iterations,
        "seed": config.train.seed,
        "backend": backend,
        "precision": precision.to_dict(),
        "strategy": {
            "name": config.train.strategy,
            "workers": cluster.num_workers,
            "replicas": 1 if strategy is None else int(strategy.num_replicas_in_sync),
        },
        "train_seconds_this_session": round(train_seconds, 2),
        "initial": history[0] if history and history[0]["step"] == 0 else None,
        "final": history[-1],
        "best_on_test": {
            "note": best_note(data.name),
            "best_H": best_entry(history, "H"),
            "best_acc": best_entry(history, "acc"),
        },
        "history": history,
        "resumes": resumes,
    }


def write_results(out_dir, results: dict) -> str:
    """Write ``results.json`` and ``results.md`` (each atomically) into ``out_dir``; the Markdown table."""
    out_dir = Path(out_dir)
    write_json(out_dir / "results.json", results)
    table = results_table(results)
    atomic_write_text(out_dir / "results.md", f"# {results['dataset']} (seed {results['seed']})\n\n{table}\n")
    return table


def summary_line(results: dict) -> str:
    """The one-line JSON ``python -m msdn_tf.train`` prints last: final and best-on-test figures."""
    final = results["final"]
    best = results["best_on_test"]
    return json.dumps(
        {
            "dataset": results["dataset"],
            "run_dir": results["run_dir"],
            "seed": results["seed"],
            "final": {k: round(final[k], 4) for k in ("step", *METRICS)},
            "best_H_on_test": None
            if best["best_H"] is None
            else {k: round(best["best_H"][k], 4) for k in ("step", *METRICS)},
            "best_acc_on_test": None
            if best["best_acc"] is None
            else {k: round(best["best_acc"][k], 4) for k in ("step", *METRICS)},
        }
    )


# What each TensorBoard scalar is (shown under the chart).
METRIC_DESCRIPTIONS = {
    "acc": "CZSL: mean per-class top-1 accuracy on test_unseen, choosing among the unseen classes",
    "U": "GZSL U: mean per-class accuracy on test_unseen, choosing among all classes",
    "S": "GZSL S: mean per-class accuracy on test_seen, choosing among all classes",
    "H": "GZSL H: harmonic mean of U and S",
}
LOSS_DESCRIPTIONS = {
    "ce_a2v": "cross-entropy of the attribute->visual sub-net's logits (margin removed)",
    "cal_a2v": "self-calibration of the attribute->visual sub-net (weighted by loss.lambda_cal in loss)",
    "ce_v2a": "cross-entropy of the visual->attribute sub-net's logits (margin removed)",
    "cal_v2a": "self-calibration of the visual->attribute sub-net (weighted by loss.lambda_cal in loss)",
    "distill": "mutual distillation between the two sub-nets (weighted by loss.distill_weight in loss)",
    "loss": "the minimised total: ce + lambda_cal * cal per sub-net + distill_weight * distill",
}


def scalar_description(section: str, key: str) -> str:
    """The description of TensorBoard scalar ``section/key`` (``eval/H``, ``train/loss``, ...)."""
    where = {
        "eval": "after this step's period, on the test split",
        "train": "running mean over the period so far",
        "period": "running mean over the period that ended at this step",
        "final": "at the last step (results.json 'final')",
        "best_on_test": "best evaluation during training, selected on the TEST split (not an unbiased estimate)",
    }.get(section, "")
    what = METRIC_DESCRIPTIONS.get(key) or LOSS_DESCRIPTIONS.get(key) or f"metric {key} of compile(metrics=...)"
    return f"{what}; {where}" if where else what


def tensorboard_dir(out_dir) -> Path:
    """Where a run's TensorBoard events go: the run directory itself, so TensorBoard names the run after it.

    ``tensorboard --logdir runs`` then lists ``cub-seed214-...`` rather than
    ``cub-seed214-.../tensorboard``. A run begun before this layout (events in
    ``tensorboard/``) keeps writing there when resumed.
    """
    out_dir = Path(out_dir)
    legacy = out_dir / "tensorboard"
    return legacy if any(legacy.glob("events.out.tfevents.*")) else out_dir


def write_eval_summaries(writer, step: int, entry: dict, losses: dict) -> None:
    """TensorBoard scalars of one evaluation: ``eval/acc|U|S|H`` and the period's ``period/<loss>``."""
    import tensorflow as tf

    with writer.as_default(step=step):
        for key in METRICS:
            tf.summary.scalar(f"eval/{key}", entry[key], description=scalar_description("eval", key))
        for key, value in losses.items():
            tf.summary.scalar(f"period/{key}", value, description=scalar_description("period", key))


def hparams_of(config) -> dict:
    """The resolved config as the hparams plugin's flat ``{"section.key": bool|int|float|str}``."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            if isinstance(value, (bool, int, float, str)):
                flat[f"{section}.{key}"] = value
            else:  # lists and None: their YAML text
                flat[f"{section}.{key}"] = "none" if value is None else str(value)
    return flat


def write_hparams(writer, config, run_name: str) -> None:
    """Log the resolved config with the hparams plugin (one session, named ``run_name``).

    With the ``final/*`` and ``eval/*`` scalars, TensorBoard's HPARAMS tab then compares
    runs in one table (hyper-parameters against the figures).
    """
    from tensorboard.plugins.hparams import api as hp

    with writer.as_default():
        hp.hparams(hparams_of(config), trial_id=run_name)


def write_final_summaries(writer, results: dict) -> None:
    """The figures of ``results.json`` as ``final/*`` and ``best_on_test/*`` scalars at the last step."""
    import tensorflow as tf

    final = results["final"]
    with writer.as_default(step=int(final["step"])):
        for key in METRICS:
            tf.summary.scalar(f"final/{key}", final[key], description=scalar_description("final", key))
        for key in ("H", "acc"):
            best = results["best_on_test"][f"best_{key}"]
            if best is not None:
                tf.summary.scalar(f"best_on_test/{key}", best[key], description=scalar_description("best_on_test", key))
    writer.flush()


class TensorBoardLosses:
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
                                tf.summary.scalar(
                                    f"train/{key}", float(value), description=scalar_description("train", key)
                                )

        return Callback()


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
