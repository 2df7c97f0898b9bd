"""Evaluate a run directory and write its report (library of ``python -m msdn_tf.evaluate``).

:func:`evaluate_run` is what ``python -m msdn_tf.evaluate --run DIR [--gamma G] [--calibration-curve]`` calls.

Works for any run directory holding ``config.yaml`` and ``model.keras``: one
written by ``python -m msdn_tf.train`` or by ``python -m msdn_tf.convert``.
Writes to ``DIR/eval/`` (or ``--out``):

* ``metrics.json``: CZSL acc, GZSL U/S/H of the fused logits and of each sub-net,
  the protocol that produced the weights, per-class accuracies; with
  ``--calibration-curve`` also the seen-unseen curve and its AUSUC;
* ``per_class.csv``: class id, class name, seen/unseen, images, CZSL accuracy
  (unseen classes), GZSL accuracy;
* ``report.md``: the same as markdown tables (also printed);
* ``curve.png`` with ``--calibration-curve``.

Every report names its ``protocol``: how the evaluated weights were chosen
(see docs/evaluation.md). The model in ``model.keras`` of a training run is its
last step: protocol ``final``. A run directory without a training history
(e.g. a converted checkpoint) is evaluated ``as-is``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from msdn_tf.errors import MSDNError
from msdn_tf.limits import load_json_file
from msdn_tf.utils import atomic_write_text, markdown_table, write_json

PROTOCOL_NOTES = {
    "reference": "selected on the test split, as the reference; optimistic",
    "final": "the last training step; the test split was not used to choose anything",
    "validation": (
        "steps, lambda_cal and gamma chosen on a class-disjoint validation split of the "
        "seen classes; test split evaluated once"
    ),
    "as-is": (
        "weights evaluated as given (no training history); released reference checkpoints "
        "were themselves selected on the test split"
    ),
}

# Written by the validation protocol into its final run directory: the choices made on validation data.
PROTOCOL_RESULT = "protocol_result.json"

METRIC_LABELS = (("acc", "CZSL acc %"), ("U", "GZSL U %"), ("S", "GZSL S %"), ("H", "GZSL H %"))


def pct(x) -> float:
    return 100.0 * float(x)


def run_protocol_name(run_dir) -> str:
    """How the weights of a run directory were chosen.

    ``validation`` for the final run of the validation protocol (it holds
    ``protocol_result.json``), ``final`` for a training run (``results.json`` with
    a history), else ``as-is``.
    """
    if (Path(run_dir) / PROTOCOL_RESULT).is_file():
        return "validation"
    path = Path(run_dir) / "results.json"
    if path.is_file():
        content = load_json_file(path, "results", MSDNError)
        if isinstance(content, dict) and content.get("history"):
            return "final"
    return "as-is"


def per_class_rows(data, logits: dict, gamma: float = 0.0) -> list:
    """One dict per class with test images: id, name, split, images, CZSL and GZSL accuracy.

    Args:
        data: the :class:`~msdn_tf.data.base.ZSLData`.
        logits: ``evaluate_model(..., return_logits=True)["_logits"]``.
        gamma: calibrated-stacking constant used for the GZSL column.
    """
    from msdn_tf.evaluation.metrics import czsl_predictions, gzsl_predictions, per_class_accuracies

    seen, unseen = data.seen_classes, data.unseen_classes
    ys, yu = logits["labels_seen"], logits["labels_unseen"]
    ls, lu = logits["seen"]["logits"], logits["unseen"]["logits"]
    czsl = per_class_accuracies(yu, czsl_predictions(lu, unseen), unseen)
    gzsl = {
        **per_class_accuracies(ys, gzsl_predictions(ls, seen, gamma), seen),
        **per_class_accuracies(yu, gzsl_predictions(lu, seen, gamma), unseen),
    }
    counts = {**{int(c): int(np.sum(ys == c)) for c in seen}, **{int(c): int(np.sum(yu == c)) for c in unseen}}
    rows = []
    for c in sorted(gzsl):
        rows.append(
            {
                "class_id": c,
                "class_name": data.class_names[c],
                "split": "unseen" if c in czsl else "seen",
                "images": counts[c],
                "czsl_acc": czsl.get(c),
                "gzsl_acc": gzsl[c],
            }
        )
    return rows


def per_class_csv(rows: list) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["class_id", "class_name", "split", "images", "czsl_acc", "gzsl_acc"])
    for r in rows:
        writer.writerow(
            [
                r["class_id"],
                r["class_name"],
                r["split"],
                r["images"],
                "" if r["czsl_acc"] is None else f"{r['czsl_acc']:.6f}",
                f"{r['gzsl_acc']:.6f}",
            ]
        )
    return out.getvalue()


def metrics_row(label, m: dict, *extra) -> list:
    return [label, *extra, *[pct(m[k]) for k in ("acc", "U", "S", "H")]]


def evaluate_run(
    run_dir, gamma: float = 0.0, data_dir=None, calibration_curve: bool = False, data=None, out_dir=None, log=print
) -> dict:
    """Evaluate the model of a run directory on the test split and write the reports.

    Args:
        run_dir: a run directory (``config.yaml`` + ``model.keras``).
        gamma: calibrated-stacking constant subtracted from seen-class scores (0: none).
        data_dir: override ``data.data_dir`` of the run's config.
        calibration_curve: also compute the seen-unseen curve, AUSUC and ``curve.png``.
        data: an already loaded dataset (default: load the run's dataset).
        out_dir: output folder, default ``run_dir/eval``.
        log: function for progress lines.

    Returns:
        The content of ``metrics.json``.
    """
    from msdn_tf.evaluation.predict import evaluate_model

    run_dir = Path(run_dir)
    config, model, data = _load_run_and_data(run_dir, data_dir, data)
    protocol = run_protocol_name(run_dir)
    log(f"msdn-tf evaluate: {run_dir} ({config.data.dataset}, protocol {protocol}, gamma {gamma:g})")
    # Quiet: one line of ours, no Keras step lines (the results are what the command prints).
    log(
        f"msdn-tf evaluate: predicting {len(data.test_seen_loc)} test_seen and "
        f"{len(data.test_unseen_loc)} test_unseen images"
    )
    result = evaluate_model(model, data, config.data.eval_batch_size, gamma=gamma, return_logits=True, verbose=0)
    logits = result.pop("_logits")
    rows = per_class_rows(data, logits, gamma)

    out_dir = Path(out_dir) if out_dir else run_dir / "eval"
    metrics = {
        "run_dir": str(run_dir),
        "dataset": config.data.dataset,
        "protocol": protocol,
        "protocol_note": PROTOCOL_NOTES[protocol],
        "gamma": float(gamma),
        "bias": float(model.bias_value),
        "margin_gap": margin_gap(model),
        "fusion_weights": list(model.fusion_weights),
        **{k: float(result[k]) for k in ("acc", "U", "S", "H")},
        "a2v": result["a2v"],
        "v2a": result["v2a"],
        "per_class": rows,
    }
    if gamma:
        from msdn_tf.evaluation.metrics import zsl_metrics
        from msdn_tf.evaluation.predict import zsl_arguments

        metrics["gamma_0"] = zsl_metrics(*zsl_arguments(logits, data), gamma=0.0)
    if protocol == "validation":
        metrics["validation_choice"] = _validation_choice(run_dir, gamma, log)
    reference = _reference_from_results(run_dir) if protocol == "final" else {}
    if reference:
        metrics["reference"] = reference
    if calibration_curve:
        metrics["calibration_curve"] = _calibration_curve(
            logits, data, metrics, gamma, out_dir / "curve.png", f"{config.data.dataset}: {run_dir.name}"
        )
    _write_reports(out_dir, metrics, rows, calibration_curve, log)
    return metrics


def _load_run_and_data(run_dir: Path, data_dir, data):
    """``(config, model, data)`` of a run; the dataset must have the model's seen/unseen classes."""
    from msdn_tf.data.registry import load_dataset
    from msdn_tf.evaluation.runs import load_run

    config, model = load_run(run_dir)
    if data_dir:
        config.data.data_dir = str(data_dir)
    data = data if data is not None else load_dataset(config)
    if (
        list(model.seen_classes) != data.seen_classes.tolist()
        or list(model.unseen_classes) != data.unseen_classes.tolist()
    ):
        raise MSDNError(
            f"{run_dir / 'model.keras'}: the model's seen/unseen classes ({len(model.seen_classes)}/"
            f"{len(model.unseen_classes)}) differ from those of the dataset {data.source} "
            f"({len(data.seen_classes)}/{len(data.unseen_classes)}); wrong --data-dir?"
        )
    return config, model, data


def _validation_choice(run_dir: Path, gamma: float, log) -> dict:
    """What the validation protocol chose (``protocol_result.json``); notes a different ``gamma``."""
    choice = load_json_file(run_dir / PROTOCOL_RESULT, "protocol result", MSDNError).get("selection", {})
    if "gamma" in choice and abs(choice["gamma"] - gamma) > 1e-12:
        log(
            f"msdn-tf evaluate: note: the validation protocol chose gamma {choice['gamma']:.6g}; "
            f"this evaluation uses --gamma {gamma:g}"
        )
    return choice


def _calibration_curve(logits: dict, data, metrics: dict, gamma: float, path: Path, title: str) -> dict:
    """The seen-unseen curve over gamma on the test split (an oracle) and its figure at ``path``."""
    from msdn_tf.evaluation.calibration import plot_curve, seen_unseen_curve
    from msdn_tf.evaluation.predict import zsl_arguments

    curve = seen_unseen_curve(*zsl_arguments(logits, data), max_points=2000)
    curve["best"]["note"] = "best H over gamma on the TEST split: an oracle, optimistic"
    plot_curve(
        curve,
        path,
        title=title,
        marks=[
            (f"gamma = {gamma:g}", metrics["S"], metrics["U"]),
            ("best H on test (oracle)", curve["best"]["S"], curve["best"]["U"]),
        ],
    )
    return curve


def _write_reports(out_dir: Path, metrics: dict, rows: list, calibration_curve: bool, log) -> None:
    """``metrics.json``, ``per_class.csv`` and ``report.md`` (also logged)."""
    write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "per_class.csv", per_class_csv(rows))
    report = render_report(metrics)
    atomic_write_text(out_dir / "report.md", report)
    log(report)
    log(
        f"msdn-tf evaluate: wrote {out_dir}/metrics.json, per_class.csv, report.md"
        + (", curve.png" if calibration_curve else "")
    )


def _reference_from_results(run_dir) -> dict:
    """The reference protocol's figures (best on the test split during training), if there is a history."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return {}
    content = load_json_file(path, "results", MSDNError)
    history = [h for h in content.get("history", []) if h.get("step", 0) > 0]
    if not history:
        return {}
    return reference_selection(history)


def reference_selection(history: list) -> dict:
    """Best H and best CZSL acc over a training history (test-split evaluations), as the reference reports."""
    history = [h for h in history if h["step"] > 0]
    best_h = max(history, key=lambda h: (h["H"], -h["step"]))
    best_acc = max(history, key=lambda h: (h["acc"], -h["step"]))
    pick = lambda h: {k: h[k] for k in ("step", "acc", "U", "S", "H")}
    return {
        "protocol": "reference",
        "note": PROTOCOL_NOTES["reference"],
        "best_H": pick(best_h),
        "best_acc": pick(best_acc),
        # what the reference reports: acc from its best-acc evaluation, U/S/H from its best-H one
        "acc": best_acc["acc"],
        "U": best_h["U"],
        "S": best_h["S"],
        "H": best_h["H"],
    }


def margin_gap(model) -> float:
    """How much the model's own margin favours unseen over seen classes in the fused scores.

    Both sub-nets' logits carry ``+bias`` (unseen) / ``-bias`` (seen), so the fused
    ``w1 * S1 + w2 * S2`` carries a gap of ``2 * bias * (w1 + w2)``: calibrated stacking
    built into the model (docs/reference.md §7). ``--gamma`` adds to it.
    """
    return float(2.0 * model.bias_value * sum(model.fusion_weights))


def render_report(metrics: dict) -> str:
    lines = [
        f"# Evaluation of {metrics['run_dir']} ({metrics['dataset']})",
        "",
        f"## protocol: {metrics['protocol']}",
        "",
        f"{metrics['protocol_note']}.",
        "",
        f"Calibrated stacking gamma = {metrics['gamma']:g} (subtracted from seen-class scores) on top of "
        f"the model's margin bias = {metrics.get('bias', 0.0):g}, which already favours unseen classes by "
        f"{metrics.get('margin_gap', 0.0):g} in the fused scores; fusion weights {metrics['fusion_weights']}.",
        "",
    ]
    if metrics.get("validation_choice"):
        c = metrics["validation_choice"]
        lines += [
            f"Chosen on validation: lambda_cal {c.get('lambda_cal')}, {c.get('step')} steps, "
            f"gamma {c.get('gamma', 0.0):.6g}.",
            "",
        ]
    rows = [
        metrics_row("fused", metrics),
        metrics_row("A->V sub-net", metrics["a2v"]),
        metrics_row("V->A sub-net", metrics["v2a"]),
    ]
    if "gamma_0" in metrics:
        rows.append(metrics_row("fused, gamma = 0", metrics["gamma_0"]))
    lines += [markdown_table(["logits", *[label for _, label in METRIC_LABELS]], rows), ""]
    if "calibration_curve" in metrics:
        c = metrics["calibration_curve"]
        lines += [
            "## calibration curve",
            "",
            f"AUSUC = {pct(c['ausuc']):.2f} (area under U against S over all gamma; curve.png). "
            f"Best H on the test curve (oracle, optimistic): {pct(c['best']['H']):.2f} at gamma "
            f"{c['best']['gamma']:.4g} (U {pct(c['best']['U']):.2f}, S {pct(c['best']['S']):.2f}).",
            "",
        ]
    if "reference" in metrics:
        r = metrics["reference"]
        lines += [
            "## protocol: reference",
            "",
            f"{r['note']} (from results.json).",
            "",
            markdown_table(
                ["selection", "step", *[label for _, label in METRIC_LABELS]],
                [
                    metrics_row("best H on test", r["best_H"], r["best_H"]["step"]),
                    metrics_row("best CZSL acc on test", r["best_acc"], r["best_acc"]["step"]),
                ],
            ),
            "",
        ]
    rows = [
        [
            r["class_id"],
            r["class_name"],
            r["split"],
            r["images"],
            "" if r["czsl_acc"] is None else pct(r["czsl_acc"]),
            pct(r["gzsl_acc"]),
        ]
        for r in metrics["per_class"]
    ]
    lines += [
        "## per class",
        "",
        markdown_table(
            ["id", "class", "split", "images", "CZSL acc %", f"GZSL acc % (gamma {metrics['gamma']:g})"], rows
        ),
        "",
    ]
    return "\n".join(lines)
