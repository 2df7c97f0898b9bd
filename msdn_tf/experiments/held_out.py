"""Classes added after training, measured: hold unseen classes out of the data, train, add them back.

:func:`run_held_out_experiment` is what ``python -m msdn_tf.held_out`` runs:

1. choose ``hold_out`` unseen classes of the dataset (seeded, by default half of them; or by name);
2. train run ``added/`` on a view of the data WITHOUT them: no image, no attribute
   row, not in the self-calibration's unseen mass (:func:`held_out_view`);
3. write their rows of the dataset's class table to ``held_out_classes.csv`` and add
   them to the trained model (:func:`msdn_tf.zeroshot.retarget_run`, no retraining);
4. train run ``from_start/`` on the full data (the same config and seed): a model
   that knew the classes' descriptions from the start;
5. measure both on the full data's test images with the same code
   (:func:`msdn_tf.zeroshot.evaluate_class_set`): CZSL over the unseen side, GZSL
   U/S/H, and the held-out classes' CZSL/GZSL accuracy next to chance.

Writes ``OUT/results.json`` and ``OUT/results.md`` (the table of docs/zero_shot.md).
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from msdn_tf.errors import ConfigError, DataError


def held_out_view(data, held_out: Sequence[int]):
    """``data`` without the classes ``held_out``: their images, rows and names are gone; ids renumbered."""
    from msdn_tf.data.base import ZSLData
    from msdn_tf.experiments.protocols import RowSubsetFeatures

    held = set(int(c) for c in held_out)
    keep_classes = np.array([c for c in range(data.num_classes) if c not in held], np.int64)
    new_id = -np.ones(data.num_classes, np.int64)
    new_id[keep_classes] = np.arange(keep_classes.size)
    keep_rows = np.flatnonzero(new_id[data.labels] >= 0)
    local = -np.ones(data.labels.shape[0], np.int64)
    local[keep_rows] = np.arange(keep_rows.size)

    def split(loc):
        if loc is None:
            return None
        loc = np.asarray(loc)
        return local[loc[local[loc] >= 0]]

    return ZSLData(
        name=data.name,
        features=RowSubsetFeatures(data.features, keep_rows),
        labels=new_id[data.labels[keep_rows]],
        trainval_loc=split(data.trainval_loc),
        test_seen_loc=split(data.test_seen_loc),
        test_unseen_loc=split(data.test_unseen_loc),
        att=data.att[keep_classes],
        w2v=data.w2v,
        class_names=[data.class_names[c] for c in keep_classes],
        attribute_names=data.attribute_names,
        train_loc=split(data.train_loc),
        val_loc=split(data.val_loc),
        original_att=None if data.original_att is None else np.asarray(data.original_att)[keep_classes],
        source=f"{data.source} (without {len(held)} held-out classes)",
    )


def write_class_file(path, data, classes: Sequence[int]) -> Path:
    """The rows of ``classes`` from the dataset's class table (``original_att`` when present) as a class CSV."""
    raw = np.asarray(data.original_att if data.original_att is not None else data.att, np.float64)
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["class", *data.attribute_names])
        for c in classes:
            w.writerow([data.class_names[c], *[repr(float(v)) for v in raw[c]]])
    return path


def choose_held_out(data, hold_out, seed: int) -> list:
    """Class ids to hold out: ``hold_out`` names, or that many unseen classes drawn with ``seed``
    (``None``: half of the unseen classes, at least one)."""
    unseen = [int(c) for c in data.unseen_classes]
    if hold_out is None:
        hold_out = max(1, len(unseen) // 2)
    if isinstance(hold_out, int):
        if not 1 <= hold_out < len(unseen):
            raise ConfigError(
                f"--hold-out must be between 1 and {len(unseen) - 1} (the data has {len(unseen)} unseen classes; "
                "at least one must stay for training's self-calibration)"
            )
        rng = np.random.default_rng([int(seed), 22])
        return sorted(int(c) for c in rng.choice(unseen, size=hold_out, replace=False))
    index = {n: i for i, n in enumerate(data.class_names)}
    out = []
    for name in hold_out:
        if name not in index:
            raise DataError(f"{data.source}: no class named {name!r} to hold out")
        if index[name] not in unseen:
            raise DataError(f"{data.source}: class {name!r} is a seen class; hold out unseen classes only")
        out.append(index[name])
    if len(out) >= len(unseen):
        raise ConfigError("at least one unseen class must stay in the training data (self-calibration needs one)")
    return sorted(out)


def run_held_out_experiment(config, out_dir, *, hold_out=None, data=None, log=print) -> dict:
    """Train without some unseen classes, add them from their descriptions, compare with a run that had them.

    Args:
        config: the resolved :class:`~msdn_tf.config.Config` of both runs.
        out_dir: output folder (``added/``, ``from_start/``, the class file, the results).
        hold_out: an int (that many unseen classes, seeded by ``train.seed``), class names, or
            ``None`` (half of the unseen classes).
        data: the full dataset (default: load ``config``'s).
        log: progress lines.

    Returns:
        The content of ``results.json``.
    """
    from msdn_tf.data.registry import load_dataset
    from msdn_tf.evaluation.runs import load_run
    from msdn_tf.training.loop import run_training
    from msdn_tf.utils import atomic_write_text, write_json
    from msdn_tf.zeroshot import ADDED, evaluate_class_set, retarget_run, trained_class_set

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = data if data is not None else load_dataset(config)
    held = choose_held_out(full, hold_out, config.train.seed)
    names = [full.class_names[c] for c in held]
    log(f"msdn-tf held-out: holding out {names} ({len(held)} of {len(full.unseen_classes)} unseen classes)")
    view = held_out_view(full, held)
    quiet = (lambda *a, **k: None) if log is None else log
    run_training(copy.deepcopy(config), out_dir / "added", data=view, log=quiet)
    class_file = write_class_file(out_dir / "held_out_classes.csv", full, held)
    model, classes, _ = retarget_run(out_dir / "added", class_file)
    added = evaluate_class_set(model, classes, full, batch_size=config.data.eval_batch_size)

    run_training(copy.deepcopy(config), out_dir / "from_start", data=full, log=quiet)
    _, known_model = load_run(out_dir / "from_start")
    known_classes = trained_class_set(known_model, full.class_names)
    known = evaluate_class_set(known_model, known_classes, full, batch_size=config.data.eval_batch_size)

    def held_acc(result, key):
        values = [r[key] for r in result["per_class"] if r["name"] in names and r[key] is not None]
        return float(np.mean(values)) if values else None

    rows = {}
    for label, result in (("from_start", known), ("added", added)):
        rows[label] = {
            **{k: result[k] for k in ("acc", "U", "S", "H")},
            "held_out_czsl": held_acc(result, "czsl"),
            "held_out_gzsl": held_acc(result, "gzsl"),
            "chance_czsl": result["chance_czsl"],
        }
    results = {
        "dataset": config.data.dataset,
        "seed": config.train.seed,
        "held_out_classes": names,
        "unseen_classes": int(len(full.unseen_classes)),
        "added_classes": [n for n, s in zip(classes.names, classes.status) if s == ADDED],
        "class_file": str(class_file),
        "runs": rows,
        "details": {"from_start": known, "added": added},
    }
    write_json(out_dir / "results.json", results)
    text = results_markdown(results)
    atomic_write_text(out_dir / "results.md", text)
    log(text)
    return results


def results_markdown(results: dict) -> str:
    """The comparison table of :func:`run_held_out_experiment`."""
    from msdn_tf.utils import markdown_table

    def pct(x) -> Optional[str]:
        return "-" if x is None else f"{100.0 * x:.1f}"

    labels = {
        "from_start": "knew the held-out classes from the start",
        "added": "held-out classes added after training",
    }
    body = [
        [
            labels[k],
            pct(r["acc"]),
            pct(r["U"]),
            pct(r["S"]),
            pct(r["H"]),
            pct(r["held_out_czsl"]),
            pct(r["held_out_gzsl"]),
            pct(r["chance_czsl"]),
        ]
        for k, r in results["runs"].items()
    ]
    return (
        f"Held out of {results['dataset']} (seed {results['seed']}): {', '.join(results['held_out_classes'])} "
        f"({len(results['held_out_classes'])} of {results['unseen_classes']} unseen classes)\n\n"
        + markdown_table(
            ["model", "CZSL %", "U %", "S %", "H %", "held-out CZSL %", "held-out GZSL %", "CZSL chance %"], body
        )
        + "\n"
    )
