"""The ablations of the paper's Table 2.

The library of ``python -m msdn_tf.ablations --dataset demo [--rows gap,full]``.

Each row is a YAML file of overrides in ``configs/ablations/<row>.yaml``, applied
on top of the dataset's config. Every row is trained once per seed; the report
gives mean ± std over seeds under the ``final`` protocol (last step) and, in
separate columns marked ``[ref*]``, under the ``reference`` protocol (best on the
test split during training, optimistic).

Single-branch rows "with distillation" train both sub-nets with the full loss
(distillation needs two predictions) and evaluate with fusion weights on one
sub-net only; "without distillation" rows train only that sub-net.

``--check`` is the quality gate of the demo: the full model's CZSL accuracy must
be at least 3x chance (1/|unseen|) on every seed, and its mean at least 5 points
above the GAP baseline's mean; it exits with 1 otherwise.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from msdn_tf.config import CONFIG_DIR, load_yaml, merge, validate
from msdn_tf.errors import ConfigError
from msdn_tf.evaluation.report import PROTOCOL_NOTES, pct
from msdn_tf.experiments.protocols import METRICS, aggregate, default_train_fn, mean_std, reference_and_final
from msdn_tf.utils import atomic_write_text, markdown_table, write_json

ABLATION_DIR = CONFIG_DIR / "ablations"

# row name -> label in the table (paper Table 2 wording). Order = table order.
ROWS = {
    "gap": "baseline: global average pooling -> attributes",
    "v2a": "V->A only, w/o distillation",
    "v2a_distill": "V->A only, with distillation",
    "a2v": "A->V only, w/o distillation",
    "a2v_distill": "A->V only, with distillation",
    "both_no_distill": "both sub-nets, w/o distillation",
    "jsd": "both, JSD term only",
    "logit": "both, logit term only",
    "full": "full MSDN (JSD + logit term)",
}

# Rows outside Table 2, run only when named (not part of "all").
EXTRA_ROWS = {
    "full_bf16": "full MSDN, train.precision=mixed_bfloat16",
}
PARITY_POINTS = 0.01  # --check-precision: |mixed_bfloat16 - float32| of the mean final CZSL acc and H

CHECK_CHANCE_FACTOR = 3.0
CHECK_MARGIN_OVER_GAP = 0.05


def parse_rows(text: str) -> list:
    if text in (None, "", "all"):
        return list(ROWS)
    rows = [r.strip() for r in text.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS and r not in EXTRA_ROWS:
            raise ConfigError(f"--rows: unknown row {r!r}; known rows: all, {', '.join(list(ROWS) + list(EXTRA_ROWS))}")
    return rows


def row_config(config, row: str, ablation_dir=None):
    """``config`` with ``<ablation_dir>/<row>.yaml`` applied on top (a copy)."""
    import copy

    path = Path(ablation_dir or ABLATION_DIR) / f"{row}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: ablation config not found (rows are files in {path.parent})")
    cfg = merge(copy.deepcopy(config), load_yaml(path), str(path))
    validate(cfg)
    return cfg


def run_ablations(
    config,
    rows: Sequence[str],
    out_dir=None,
    seeds: int = 1,
    data=None,
    train_fn: Optional[Callable] = None,
    log=print,
    ablation_dir=None,
) -> dict:
    """Train every row for every seed and write ``ablations.json`` and ``ablations.md``.

    Args:
        config: the dataset's resolved config (rows are applied on top).
        rows: row names (keys of :data:`ROWS`).
        out_dir: output folder (default ``<train.out_dir>/ablations/<dataset>``); runs go to
            ``<out_dir>/<row>/train/seed_<s>`` and are reused when finished (an interrupted
            ablation continues where it stopped).
        seeds: seeds ``config.train.seed + i``.
        data: an already loaded dataset.
        train_fn: training function (see :func:`msdn_tf.experiments.protocols.run_protocol`).
        log: function for progress lines.
        ablation_dir: folder of the row configs (default ``configs/ablations``).

    Returns:
        The content of ``ablations.json``.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    out_dir = Path(out_dir) if out_dir else Path(config.train.out_dir) / "ablations" / config.data.dataset
    train_fn = train_fn or default_train_fn
    configs = {row: row_config(config, row, ablation_dir) for row in rows}  # fail fast on a bad file
    if data is None:
        from msdn_tf.data.registry import load_dataset

        data = load_dataset(config)
    started = time.time()
    total, done = len(rows) * seeds, 0
    result = {
        "dataset": config.data.dataset,
        "seeds": [config.train.seed + i for i in range(seeds)],
        "unseen_classes": int(len(data.unseen_classes)),
        "chance_acc": 1.0 / len(data.unseen_classes),
        "protocols": {"final": PROTOCOL_NOTES["final"], "reference": PROTOCOL_NOTES["reference"]},
        "rows": {},
    }
    for row in rows:
        per_seed = []
        for i in range(seeds):
            seed = config.train.seed + i
            log(f"msdn-tf ablations: row {row}, seed {seed} ({done + 1}/{total}, {time.time() - started:.0f} s so far)")
            ref, fin = reference_and_final(configs[row], data, out_dir / row, seed, train_fn, log)
            per_seed.append({"seed": seed, "final": fin, "reference": ref})
            done += 1
        result["rows"][row] = {
            "label": ROWS.get(row) or EXTRA_ROWS[row],
            "config": str(Path(ablation_dir or ABLATION_DIR) / f"{row}.yaml"),
            "seeds": per_seed,
            "final": aggregate([s["final"] for s in per_seed]),
            "reference": aggregate([s["reference"] for s in per_seed]),
        }
    result["wall_seconds"] = round(time.time() - started, 1)
    write_json(out_dir / "ablations.json", result)
    text = render_ablations(result)
    atomic_write_text(out_dir / "ablations.md", text)
    log(text)
    return result


def render_ablations(result: dict) -> str:
    header = [
        "row",
        "setting",
        "seeds",
        "CZSL acc %",
        "GZSL U %",
        "GZSL S %",
        "GZSL H %",
        "CZSL acc % [ref*]",
        "GZSL H % [ref*]",
    ]
    rows = []
    for name, r in result["rows"].items():
        rows.append(
            [
                name,
                r["label"],
                len(r["seeds"]),
                *[mean_std(r["final"][k]) for k in METRICS],
                mean_std(r["reference"]["acc"]),
                mean_std(r["reference"]["H"]),
            ]
        )
    return "\n".join(
        [
            f"# Ablations on {result['dataset']} (paper Table 2)",
            "",
            f"Mean ± std (sample std) over seeds {result['seeds']}. Chance CZSL accuracy: "
            f"{pct(result['chance_acc']):.2f}% (1/{result['unseen_classes']} unseen classes).",
            "",
            "## protocol: final (columns without [ref*])",
            "",
            f"{PROTOCOL_NOTES['final']}.",
            "",
            markdown_table(header, rows),
            "",
            f"[ref*] protocol: reference: {PROTOCOL_NOTES['reference']} (best CZSL acc and best H over "
            "all test evaluations during training).",
            "",
            "Single-branch rows with distillation train both sub-nets with the full loss and evaluate one "
            "sub-net (fusion weights [1, 0] or [0, 1]); rows without distillation train one sub-net only.",
            "",
            f"Wall time: {result.get('wall_seconds', 0):.0f} s.",
            "",
        ]
    )


def quality_check(result: dict, log=print) -> bool:
    """The demo quality gate: full >= 3x chance on every seed, full mean >= GAP mean + 5 points."""
    rows = result["rows"]
    if "full" not in rows or "gap" not in rows:
        raise ConfigError("--check needs the rows gap and full (e.g. --rows gap,full)")
    chance = result["chance_acc"]
    ok = True
    for s in rows["full"]["seeds"]:
        acc = s["final"]["acc"]
        passed = acc >= CHECK_CHANCE_FACTOR * chance
        ok &= passed
        log(
            f"{'PASS' if passed else 'FAIL'}: full model, seed {s['seed']}: CZSL acc {pct(acc):.2f}% "
            f">= {CHECK_CHANCE_FACTOR:g} x chance = {pct(CHECK_CHANCE_FACTOR * chance):.2f}%"
        )
    full, gap = rows["full"]["final"]["acc"]["mean"], rows["gap"]["final"]["acc"]["mean"]
    passed = full >= gap + CHECK_MARGIN_OVER_GAP
    ok &= passed
    log(
        f"{'PASS' if passed else 'FAIL'}: full model mean CZSL acc {pct(full):.2f}% >= GAP baseline mean "
        f"{pct(gap):.2f}% + {pct(CHECK_MARGIN_OVER_GAP):.0f} points = {pct(gap + CHECK_MARGIN_OVER_GAP):.2f}%"
    )
    return bool(ok)


def precision_check(result: dict, log=print) -> bool:
    """Learning parity of the fast path: ``full_bf16`` within 1 point of ``full`` (mean final CZSL acc and H)."""
    rows = result["rows"]
    if "full" not in rows or "full_bf16" not in rows:
        raise ConfigError("--check-precision needs the rows full and full_bf16 (e.g. --rows full,full_bf16)")
    ok = True
    for key, name in (("acc", "CZSL acc"), ("H", "H")):
        a, b = rows["full"]["final"][key]["mean"], rows["full_bf16"]["final"][key]["mean"]
        passed = abs(b - a) <= PARITY_POINTS + 1e-12
        ok &= passed
        log(
            f"{'PASS' if passed else 'FAIL'}: mean final {name}: mixed_bfloat16 {pct(b):.2f}% vs float32 "
            f"{pct(a):.2f}% (difference {pct(b - a):+.2f} points, allowed ±{pct(PARITY_POINTS):.0f})"
        )
    return bool(ok)
