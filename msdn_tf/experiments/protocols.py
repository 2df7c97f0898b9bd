"""Model-selection protocols, the library of ``python -m msdn_tf.protocols --dataset demo --protocol validation``.

Three ways to turn training into one reported number (docs/evaluation.md):

* ``reference``: best H and best CZSL acc over all evaluations on the TEST split
  during training, as the reference implementation reports. Selected on the test
  split: optimistic.
* ``final``: the model after the configured number of steps. Honest as long as
  the schedule itself was not tuned on the test split.
* ``validation``: the seen classes' class-disjoint ``train_loc``/``val_loc`` split
  plays the zero-shot problem (val classes are "unseen"; a seeded
  ``holdout_fraction`` of each train class's images is the "seen" test side).
  The number of steps, ``lambda_cal`` (grid) and the calibration ``gamma``
  (exact curve or grid) are chosen to maximise validation H. Then the model is
  retrained on trainval with those settings and the test split evaluated once.

``reference`` and ``final`` come from the same training run (one per seed).
``--seeds N`` repeats everything for seeds ``train.seed + i`` and reports
mean ± std (sample std, ddof 1) of every metric.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from msdn_tf.data.base import ZSLData
from msdn_tf.errors import ConfigError, DataError, MSDNError
from msdn_tf.evaluation.report import PROTOCOL_NOTES, PROTOCOL_RESULT, pct, reference_selection
from msdn_tf.limits import load_json_file
from msdn_tf.utils import atomic_write_text, markdown_table, write_json

PROTOCOLS = ("reference", "final", "validation")
METRICS = ("acc", "U", "S", "H")


# --------------------------------------------------------------------------- validation view
class RowSubsetFeatures:
    """A :class:`~msdn_tf.data.base.FeatureSource` exposing only ``rows`` of ``source``.

    Local index ``i`` reads ``source`` row ``rows[i]``; nothing else of the
    source is reachable through it.
    """

    def __init__(self, source, rows):
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self.shape = (int(self.rows.size),) + tuple(source.shape[1:])

    def read(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.rows.size):
            raise DataError(
                f"row indices must lie in [0, {self.rows.size}) of this view, got [{indices.min()}, {indices.max()}]"
            )
        return self.source.read(self.rows[indices])


def holdout_split(labels: np.ndarray, rows: np.ndarray, fraction: float, seed: int):
    """Split ``rows`` into ``(keep, held_out)``: a seeded ``fraction`` of each class's rows held out.

    Every class with at least 2 rows keeps at least one and holds out at least one.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"holdout fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng([int(seed), 20220601])
    keep, held = [], []
    for c in np.unique(labels[rows]):
        members = rng.permutation(rows[labels[rows] == c])
        n_out = int(round(fraction * members.size))
        n_out = min(max(n_out, 1 if members.size >= 2 else 0), members.size - 1)
        held.extend(members[:n_out])
        keep.extend(members[n_out:])
    return np.sort(np.asarray(keep, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


def validation_view(data: ZSLData, holdout_fraction: float = 0.2, seed: int = 0) -> ZSLData:
    """The seen classes' train/val split as a zero-shot dataset of its own.

    Classes are those of ``train_loc`` (seen) and ``val_loc`` (unseen), renumbered
    ``0..C'-1``; trainval = ``train_loc`` minus a seeded ``holdout_fraction`` of
    each train class; test_seen = those held-out images; test_unseen = ``val_loc``.
    Features are read through :class:`RowSubsetFeatures`, so no test row (nor any
    row of a test-unseen class) can be read through the view.

    Args:
        data: the full dataset, with ``train_loc`` and ``val_loc``.
        holdout_fraction: share of each train class's images held out for the S side.
        seed: seed of the hold-out draw.
    """
    if data.train_loc is None or data.val_loc is None or not len(data.train_loc) or not len(data.val_loc):
        raise DataError(
            f"{data.source}: no 'train_loc'/'val_loc'; the validation protocol needs the class-disjoint "
            "train/val split of the seen classes (xlsa17 att_splits.mat has one; see docs/data.md)"
        )
    labels = data.labels
    overlap = np.intersect1d(labels[data.train_loc], labels[data.val_loc])
    if overlap.size:
        raise DataError(
            f"{data.source}: 'train_loc' and 'val_loc' share classes {overlap[:10].tolist()}; "
            "they must be class-disjoint"
        )
    keep, held = holdout_split(labels, data.train_loc, holdout_fraction, seed)
    if held.size == 0:
        raise DataError(f"{data.source}: 'train_loc' has too few images per class to hold any out")
    classes = np.unique(np.concatenate([labels[data.train_loc], labels[data.val_loc]]))
    new_id = {int(c): i for i, c in enumerate(classes)}
    rows = np.concatenate([keep, held, data.val_loc])
    local = np.arange(rows.size)
    return ZSLData(
        name=f"{data.name}-validation",
        features=RowSubsetFeatures(data.features, rows),
        labels=np.array([new_id[int(c)] for c in labels[rows]], dtype=np.int64),
        trainval_loc=local[: keep.size],
        test_seen_loc=local[keep.size : keep.size + held.size],
        test_unseen_loc=local[keep.size + held.size :],
        att=data.att[classes],
        w2v=data.w2v,
        class_names=[data.class_names[c] for c in classes],
        attribute_names=data.attribute_names,
        original_att=None if data.original_att is None else np.asarray(data.original_att)[classes],
        source=f"{data.source} (validation view: train_loc minus {holdout_fraction:.0%} held out / val_loc)",
    )


# --------------------------------------------------------------------------- helpers
def aggregate(per_seed: Sequence[dict], keys=METRICS) -> dict:
    """``{key: {"mean", "std", "n", "values"}}`` over seeds; ``std`` is the sample std (ddof 1), 0 for one seed."""
    out = {}
    for key in keys:
        values = [float(r[key]) for r in per_seed]
        arr = np.asarray(values, dtype=np.float64)
        out[key] = {
            "mean": float(arr.mean()) if arr.size else float("nan"),
            "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "n": int(arr.size),
            "values": values,
        }
    return out


def mean_std(entry: dict, scale: float = 100.0) -> str:
    """``"89.17 ± 1.20"`` from an :func:`aggregate` entry (in %)."""
    return f"{scale * entry['mean']:.2f} ± {scale * entry['std']:.2f}"


def seed_config(config, seed: int):
    cfg = copy.deepcopy(config)
    cfg.train.seed = int(seed)
    cfg.train.verbose = 0 if cfg.train.verbose < 0 else cfg.train.verbose
    return cfg


def default_train_fn(*args, **kwargs):
    from msdn_tf.training.loop import run_training

    return run_training(*args, **kwargs)


def check_same_config(config, run_dir: Path) -> None:
    """Refuse to reuse or resume ``run_dir`` if it was made with another config."""
    from msdn_tf.config import load_yaml

    saved = Path(run_dir) / "config.yaml"
    if saved.is_file() and load_yaml(saved) != config.to_dict():
        raise MSDNError(
            f"{run_dir} holds a run with a different config ({saved}); "
            "choose another --out, or delete that folder to redo it"
        )


def train_or_reuse(config, run_dir: Path, data, train_fn, log, eval_hooks=()) -> dict:
    """Train into ``run_dir``; reuse its ``results.json``, or resume its checkpoint, after an interruption."""
    run_dir = Path(run_dir)
    check_same_config(config, run_dir)
    results_path = run_dir / "results.json"
    if results_path.is_file() and not eval_hooks:
        log(f"msdn-tf: reusing the finished run {run_dir}")
        return load_json_file(results_path, "results", MSDNError)
    from msdn_tf.training.resume import has_checkpoint

    resume = has_checkpoint(run_dir)
    return train_fn(config, run_dir=run_dir, resume=resume, data=data, log=log, eval_hooks=list(eval_hooks))


# --------------------------------------------------------------------------- protocols
def reference_and_final(config, data, run_root: Path, seed: int, train_fn, log) -> tuple:
    cfg = seed_config(config, seed)
    run_dir = run_root / "train" / f"seed_{seed}"
    results = train_or_reuse(cfg, run_dir, data, train_fn, log)
    history = results["history"]
    final = results["final"]
    ref = reference_selection(history)
    ref.update(seed=seed, run_dir=str(run_dir))
    fin = {
        "protocol": "final",
        "note": PROTOCOL_NOTES["final"],
        "seed": seed,
        "run_dir": str(run_dir),
        "step": final["step"],
        **{k: float(final[k]) for k in METRICS},
    }
    return ref, fin


class _SelectionRecorder:
    """Evaluation hook of a validation run: chooses gamma at every evaluation and records the candidates."""

    def __init__(self, path: Path, lambda_cal: float, gamma_grid, holdout_fraction: float):
        self.path = Path(path)
        self.lambda_cal = float(lambda_cal)
        self.gamma_grid = None if gamma_grid is None else [float(g) for g in gamma_grid]
        self.settings = {"gamma_grid": self.gamma_grid, "holdout_fraction": float(holdout_fraction)}
        self.candidates = []
        if self.path.is_file():
            saved = load_json_file(self.path, "protocol state", MSDNError)
            if saved.get("settings") != self.settings:
                raise MSDNError(
                    f"{self.path}: made with {saved.get('settings')}, now {self.settings}; "
                    "choose another --out, or delete that folder to redo it"
                )
            self.candidates = saved["candidates"]

    def __call__(self, model=None, data=None, step=0, metrics=None, writer=None):
        from msdn_tf.evaluation.calibration import choose_gamma

        if step <= 0:
            return
        from msdn_tf.evaluation.predict import zsl_arguments

        args = zsl_arguments(metrics["_logits"], data)
        best = choose_gamma(*args, grid=self.gamma_grid)
        self.candidates = [c for c in self.candidates if c["step"] != step]
        self.candidates.append(
            {
                "lambda_cal": self.lambda_cal,
                "step": int(step),
                "gamma": best["gamma"],
                "acc": float(metrics["acc"]),
                "U": best["U"],
                "S": best["S"],
                "H": best["H"],
                "H_gamma_0": float(metrics["H"]),
            }
        )
        write_json(self.path, {"settings": self.settings, "candidates": self.candidates})


class _FinalEvaluation:
    """Evaluation hook of the final retraining: the single test evaluation, with the chosen gamma."""

    def __init__(self, gamma: float, step: int):
        self.gamma, self.step, self.result = float(gamma), int(step), None

    def __call__(self, model=None, data=None, step=0, metrics=None, writer=None):
        from msdn_tf.evaluation.metrics import zsl_metrics

        if step != self.step:
            return
        from msdn_tf.evaluation.predict import zsl_arguments

        args = zsl_arguments(metrics["_logits"], data)
        from msdn_tf.evaluation.calibration import seen_unseen_curve

        self.result = {"test": zsl_metrics(*args, gamma=self.gamma), "test_gamma_0": zsl_metrics(*args, gamma=0.0)}
        # AUSUC does not depend on gamma: an honest summary of the final model's trade-off.
        self.result["curve"] = seen_unseen_curve(*args, max_points=2000)
        self.result["test"]["ausuc"] = self.result["curve"]["ausuc"]


def _validation(
    config,
    data,
    run_root: Path,
    seed: int,
    train_fn,
    log,
    lambda_grid,
    gamma_grid,
    holdout_fraction,
    scale_steps,
    on_phase,
) -> dict:
    base = seed_config(config, seed)
    root = run_root / "validation" / f"seed_{seed}"
    on_phase("selection")
    view = validation_view(data, holdout_fraction, seed)
    summary = view.summary()
    log(
        f"msdn-tf validation: {summary['seen_classes']} train classes ({summary['trainval']} images, "
        f"{summary['test_seen']} held out), {summary['unseen_classes']} val classes ({summary['test_unseen']} images)"
    )
    grid = list(lambda_grid) if lambda_grid else [base.loss.lambda_cal]
    candidates = []
    for lam in grid:
        cfg = copy.deepcopy(base)
        cfg.loss.lambda_cal = float(lam)
        run_dir = root / f"lambda_{lam:g}"
        recorder = _SelectionRecorder(run_dir / "selection.json", lam, gamma_grid, holdout_fraction)
        check_same_config(cfg, run_dir)
        if (run_dir / "results.json").is_file() and recorder.candidates:
            log(f"msdn-tf validation: reusing {run_dir}")
        else:
            log(f"msdn-tf validation: lambda_cal {lam:g}, seed {seed}: training on the validation view")
            train_or_reuse(cfg, run_dir, view, train_fn, log, eval_hooks=[recorder])
        candidates.extend(recorder.candidates)
    if not candidates:
        raise MSDNError(f"{root}: the validation runs produced no evaluation after step 0")
    chosen = max(candidates, key=lambda c: (c["H"], -c["step"], -abs(c["gamma"]), -grid.index(c["lambda_cal"])))
    steps = chosen["step"]
    if scale_steps:
        steps = max(1, int(round(steps * len(data.trainval_loc) / len(view.trainval_loc))))
    log(
        f"msdn-tf validation: chose lambda_cal {chosen['lambda_cal']:g}, {chosen['step']} steps, "
        f"gamma {chosen['gamma']:.4g} (validation H {pct(chosen['H']):.2f}); retraining on trainval for {steps} steps"
    )

    on_phase("final")
    cfg = copy.deepcopy(base)
    cfg.loss.lambda_cal = float(chosen["lambda_cal"])
    cfg.train.iterations = steps
    cfg.train.eval_every = steps
    cfg.train.eval_offset = 0  # one evaluation, after the last step
    cfg.train.eval_initial = False  # the test split is read once, after training
    final_eval = _FinalEvaluation(chosen["gamma"], steps)
    run_dir = root / "final"
    results_path = run_dir / PROTOCOL_RESULT
    check_same_config(cfg, run_dir)
    if results_path.is_file():
        final = load_json_file(results_path, "protocol result", MSDNError)
    else:
        train_or_reuse(cfg, run_dir, data, train_fn, log, eval_hooks=[final_eval])
        if final_eval.result is None:
            raise MSDNError(
                f"{run_dir}: the final retraining ended without its test evaluation at step "
                f"{steps} (interrupted after training?); delete {run_dir} and run again"
            )
        final = final_eval.result
        final["selection"] = {k: chosen[k] for k in ("lambda_cal", "step", "gamma")}
        from msdn_tf.evaluation.calibration import plot_curve

        t, t0 = final["test"], final["test_gamma_0"]
        plot_curve(
            final.pop("curve"),
            run_dir / "curve.png",
            title=f"{config.data.dataset}: validation protocol, test split",
            marks=[(f"chosen gamma = {chosen['gamma']:.3g}", t["S"], t["U"]), ("gamma = 0", t0["S"], t0["U"])],
        )
        write_json(results_path, final)
    return {
        "protocol": "validation",
        "note": PROTOCOL_NOTES["validation"],
        "seed": seed,
        "run_dir": str(root),
        "selection": {
            "lambda_cal": chosen["lambda_cal"],
            "step": chosen["step"],
            "gamma": chosen["gamma"],
            "validation": {k: chosen[k] for k in ("acc", "U", "S", "H", "H_gamma_0")},
            "lambda_grid": grid,
            "gamma_grid": None if gamma_grid is None else list(gamma_grid),
            "holdout_fraction": holdout_fraction,
            "candidates": candidates,
        },
        "step": steps,
        **{k: float(final["test"][k]) for k in METRICS},
        "ausuc": float(final["test"]["ausuc"]),
        "test_gamma_0": final["test_gamma_0"],
    }


def run_protocol(
    config,
    protocol,
    run_root=None,
    data: Optional[ZSLData] = None,
    seeds: int = 1,
    lambda_grid: Optional[Sequence[float]] = None,
    gamma_grid: Optional[Sequence[float]] = None,
    holdout_fraction: float = 0.2,
    scale_steps: bool = False,
    train_fn: Optional[Callable] = None,
    log=print,
    on_phase: Optional[Callable] = None,
) -> dict:
    """Run one selection protocol (or several) over ``seeds`` seeds and write the reports.

    Args:
        config: the resolved :class:`~msdn_tf.config.Config`.
        protocol: ``reference``, ``final``, ``validation``, or a list / comma-separated string of them.
        run_root: output folder (default ``<train.out_dir>/protocols/<dataset>``); training runs
            go below it, reports are ``<run_root>/<protocol>.json`` and ``.md``.
        data: an already loaded dataset (default: load ``config.data.dataset``).
        seeds: number of seeds, ``config.train.seed + i`` for ``i < seeds``.
        lambda_grid: ``lambda_cal`` values tried by ``validation`` (default: the config's only).
        gamma_grid: calibration constants tried by ``validation`` (default: the exact curve).
        holdout_fraction: share of each train class held out for validation S.
        scale_steps: retrain for the chosen steps times ``|trainval| / |train|`` (same epochs)
            instead of the same number of steps.
        train_fn: ``train_fn(config, run_dir=, resume=, data=, log=, eval_hooks=) -> results``
            (default :func:`msdn_tf.training.loop.run_training`; tests inject a stub).
        log: function for progress lines.
        on_phase: called with ``"selection"`` / ``"final"`` when the validation protocol
            starts choosing / starts retraining and testing (tests check what is read when).

    Returns:
        ``{protocol: {"protocol", "note", "seeds": [...], "summary": {metric: mean/std}}}``
        for one protocol that entry alone.
    """
    names = [p.strip() for p in protocol.split(",")] if isinstance(protocol, str) else list(protocol)
    for name in names:
        if name not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    train_fn = train_fn or default_train_fn
    on_phase = on_phase or (lambda name: None)
    run_root = Path(run_root) if run_root else Path(config.train.out_dir) / "protocols" / config.data.dataset
    if data is None:
        from msdn_tf.data.registry import load_dataset

        data = load_dataset(config)
    started = time.time()
    per_seed = {name: [] for name in names}
    seed_list = [config.train.seed + i for i in range(seeds)]
    for i, seed in enumerate(seed_list):
        log(f"msdn-tf protocols: seed {seed} ({i + 1}/{len(seed_list)}), {time.time() - started:.0f} s so far")
        if "reference" in names or "final" in names:
            ref, fin = reference_and_final(config, data, run_root, seed, train_fn, log)
            if "reference" in names:
                per_seed["reference"].append(ref)
            if "final" in names:
                per_seed["final"].append(fin)
        if "validation" in names:
            per_seed["validation"].append(
                _validation(
                    config,
                    data,
                    run_root,
                    seed,
                    train_fn,
                    log,
                    lambda_grid,
                    gamma_grid,
                    holdout_fraction,
                    scale_steps,
                    on_phase,
                )
            )
    out = {}
    for name in names:
        report = {
            "protocol": name,
            "note": PROTOCOL_NOTES[name],
            "dataset": config.data.dataset,
            "seeds": per_seed[name],
            "summary": aggregate(per_seed[name], METRICS + (("ausuc",) if name == "validation" else ())),
            "wall_seconds": round(time.time() - started, 1),
        }
        write_json(run_root / f"{name}.json", report)
        text = render_protocol(report)
        atomic_write_text(run_root / f"{name}.md", text)
        log(text)
        out[name] = report
    return out[names[0]] if len(names) == 1 else out


def render_protocol(report: dict) -> str:
    """Markdown: per-seed rows and a mean ± std row, headed by the protocol's name and note."""
    name = report["protocol"]
    lines = [f"## protocol: {name}", "", f"{report['note']}.", ""]
    if name == "reference":
        header = ["seed", "best-acc step", "best-H step", "CZSL acc %", "GZSL U %", "GZSL S %", "GZSL H %"]
        rows = [
            [r["seed"], r["best_acc"]["step"], r["best_H"]["step"], *[pct(r[k]) for k in METRICS]]
            for r in report["seeds"]
        ]
        blank = 2
        lines_note = (
            "CZSL acc is the best over the test evaluations; U, S, H come from the evaluation "
            "with the best H (possibly another step), as the reference reports."
        )
    elif name == "final":
        header = ["seed", "step", "CZSL acc %", "GZSL U %", "GZSL S %", "GZSL H %"]
        rows = [[r["seed"], r["step"], *[pct(r[k]) for k in METRICS]] for r in report["seeds"]]
        blank = 1
        lines_note = ""
    else:
        header = [
            "seed",
            "lambda_cal",
            "steps",
            "gamma",
            "val H %",
            "CZSL acc %",
            "GZSL U %",
            "GZSL S %",
            "GZSL H %",
            "H at gamma 0 %",
            "AUSUC %",
        ]
        rows = [
            [
                r["seed"],
                f"{r['selection']['lambda_cal']:g}",
                r["step"],
                f"{r['selection']['gamma']:.4g}",
                pct(r["selection"]["validation"]["H"]),
                *[pct(r[k]) for k in METRICS],
                pct(r["test_gamma_0"]["H"]),
                pct(r["ausuc"]),
            ]
            for r in report["seeds"]
        ]
        blank = 4
        lines_note = (
            "val H: on the validation view at the chosen settings; test columns: the single test "
            "evaluation after retraining on trainval, with the chosen gamma; AUSUC of that model "
            "(independent of gamma; curve.png in its run folder)."
        )
    summary = report["summary"]
    if len(report["seeds"]) > 1:
        rows.append(
            [
                f"mean ± std ({len(report['seeds'])} seeds)",
                *[""] * blank,
                *[mean_std(summary[k]) for k in METRICS],
                *(["", mean_std(summary["ausuc"])] if name == "validation" else []),
            ]
        )
    lines += [markdown_table(header, rows), ""]
    if lines_note:
        lines += [lines_note, ""]
    return "\n".join(lines)
