"""Check an export before it is published: TF's C++ loader, every signature against the Keras model.

:func:`verify_export` loads an export written by :func:`msdn_tf.serving.export.export_saved_model`
with TensorFlow's C++ loader (:mod:`msdn_tf.serving.cc_loader`), runs every signature, compares
with the Keras model, checks that a NaN input is refused and runs ``saved_model_cli show --all``.
:func:`report_markdown` renders its report. The command is ``python -m msdn_tf.export``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from msdn_tf.errors import MSDNError
from msdn_tf.serving.export import (
    FEATURES_SIGNATURE,
    IMAGES_SIGNATURE,
    MAPS_SIGNATURE,
    METADATA_FILE,
    METADATA_SIGNATURE,
    OPEN_SIDED_SIGNATURE,
    OPEN_SIGNATURE,
    PREDICTION_OUTPUTS,
    preprocess_image_batch,
    read_metadata,
    reference_predictions,
)
from msdn_tf.utils import subprocess_env

# ---------------------------------------------------------------------------------------------
# Verification


def synthetic_images(count: int = 3, seed: int = 0) -> list:
    """Encoded test images of different sizes and formats (PNG and JPEG), as bytes."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    sizes = [(50, 70), (80, 40), (64, 64), (33, 90)]
    out = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append((tf.io.encode_png if i % 2 == 0 else tf.io.encode_jpeg)(pixels).numpy())
    return out


def _saved_model_cli() -> Optional[str]:
    near = Path(sys.executable).with_name("saved_model_cli")
    return str(near) if near.exists() else shutil.which("saved_model_cli")


def run_saved_model_cli(export_dir) -> dict:
    """``saved_model_cli show --dir EXPORT_DIR --all``: return code, listed signatures, output."""
    cli = _saved_model_cli()
    if cli is None:
        return {"ok": False, "skipped": "saved_model_cli not found", "signatures": []}
    env = subprocess_env()
    proc = subprocess.run(
        [cli, "show", "--dir", str(export_dir), "--all"], capture_output=True, text=True, timeout=600, env=env
    )
    sigs = sorted(
        {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("signature_def['")}
        - {"__saved_model_init_op"}
    )
    return {
        "ok": proc.returncode == 0,
        "returncode": proc.returncode,
        "command": f"saved_model_cli show --dir {export_dir} --all",
        "signatures": sigs,
        "output": proc.stdout if proc.returncode == 0 else proc.stderr[-4000:],
    }


def _compare(sig, want: dict, got: dict, tol: float) -> list:
    """One check row per output; class outputs may differ only where the reference scores tie within tol."""
    rows = []
    calibrated = want["_calibrated"]
    for key in PREDICTION_OUTPUTS:
        if key not in got:
            rows.append({"signature": sig, "output": key, "ok": False, "detail": "missing output"})
            continue
        g, w = np.asarray(got[key]), np.asarray(want[key])
        if g.shape != w.shape:
            rows.append(
                {
                    "signature": sig,
                    "output": key,
                    "ok": False,
                    "detail": f"shape {list(g.shape)} != expected {list(w.shape)}",
                }
            )
            continue
        if key in ("scores", "top_k_scores", "attribute_scores"):
            diff = float(np.max(np.abs(g.astype(np.float64) - w))) if g.size else 0.0
            rows.append({"signature": sig, "output": key, "ok": diff <= tol, "max_abs_diff": diff, "tolerance": tol})
            continue
        mismatch = np.argwhere(g != w)
        if key == "czsl_class":
            ref = want["scores"].astype(np.float64)
        elif key == "top_k_attributes":
            ref = want["attribute_scores"].astype(np.float64)
        else:
            ref = calibrated
        bad = 0
        for idx in mismatch:
            b = idx[0]
            if abs(ref[b, int(g[tuple(idx)])] - ref[b, int(w[tuple(idx)])]) > tol:
                bad += 1
        rows.append(
            {
                "signature": sig,
                "output": key,
                "ok": bad == 0,
                "mismatches": int(len(mismatch)),
                "mismatches_beyond_ties": bad,
            }
        )
    return rows


def _check_refuses_nan(run, regions) -> dict:
    """The in-graph guard: a NaN input must fail inside the signature (TF Serving: INVALID_ARGUMENT)."""
    import tensorflow as tf

    from msdn_tf.serving import cc_loader

    bad = np.array(regions[:1], np.float32)
    bad[0, 0, 0] = np.nan
    row = {"signature": FEATURES_SIGNATURE, "output": "refuses a NaN input"}
    try:
        run(FEATURES_SIGNATURE, {"features": bad})
    except (cc_loader.CcLoaderError, tf.errors.InvalidArgumentError) as exc:
        ok = "NaN or inf" in str(exc)
        return row | {"ok": ok, "detail": "InvalidArgumentError" if ok else f"failed otherwise: {str(exc)[:200]}"}
    return row | {"ok": False, "detail": "answered a NaN input with status OK"}


def _expected(model, inputs, meta) -> dict:
    from keras import ops

    out = model(inputs, training=False)
    scores = np.asarray(ops.convert_to_numpy(out["logits"]), np.float32)
    ref = reference_predictions(
        scores,
        meta["seen_classes"],
        meta["unseen_classes"],
        meta["gamma"],
        meta["top_k"],
        np.asarray(ops.convert_to_numpy(out["scores_a2v"]), np.float32),
        meta.get("top_attributes", 0),
    )
    calibrated = scores.astype(np.float64).copy()
    calibrated[:, np.asarray(meta["seen_classes"], dtype=np.int64)] -= meta["gamma"]
    ref["_calibrated"] = calibrated
    return ref


def verify_export(
    export_dir,
    model,
    sample_features,
    *,
    sample_images=None,
    backbone=None,
    binary: Optional[str] = None,
    rtol: float = 1e-4,
    saved_model_cli: bool = True,
) -> dict:
    """Load ``export_dir`` with TF's C++ loader, run every signature and compare with ``model``.

    Args:
        export_dir: a version directory written by :func:`export_saved_model`.
        model: the Keras MSDN it was exported from.
        sample_features: float (B, R, F) region vectors or (B, H, W, F) maps; both
            ``serving_default`` and ``serving_maps`` are run (maps are reshaped to
            regions; regions are reshaped to maps when R is a perfect square).
        sample_images: encoded images for ``serving_images`` (default: synthetic ones
            when the export has that signature and ``backbone`` is given).
        backbone: the backbone used for the export (needed to check ``serving_images``).
        binary: a compiled C++ loader (default: :func:`cc_loader.compile_loader`).
        rtol: tolerance relative to the score scale: ``atol = rtol * max(1, max|scores|)``.
        saved_model_cli: also run ``saved_model_cli show --all``.

    Returns:
        A JSON-able report: ``ok``, ``loader`` (``"c++"`` or ``"python"`` when the C++
        loader cannot be built here), ``signatures`` (as the loader lists them),
        ``checks`` (one row per signature and output, and ``refuses a NaN input``),
        ``saved_model_cli``, ``errors``.
    """
    from msdn_tf.serving import cc_loader

    export_dir = Path(export_dir)
    meta = read_metadata(export_dir / "assets" / METADATA_FILE)
    report = {"export_dir": str(export_dir), "ok": True, "loader": "c++", "signatures": {}, "checks": [], "errors": []}
    regions, maps = _regions_and_maps(sample_features)
    try:
        run = _signature_runner(export_dir, binary, report)
    except cc_loader.CcLoaderError as exc:
        report.update(ok=False)
        report["errors"].append(str(exc))
        return report

    cases = [(FEATURES_SIGNATURE, {"features": regions}, regions)]
    if maps is not None:
        cases.append((MAPS_SIGNATURE, {"feature_maps": maps}, maps))
    if IMAGES_SIGNATURE in report["signatures"]:
        if backbone is None:
            report["errors"].append(f"{IMAGES_SIGNATURE} not checked: no backbone given")
            report["ok"] = False
        else:
            cases.append(_images_case(backbone, sample_images, meta))
    for sig, inputs, model_input in cases:
        try:
            got = run(sig, inputs)
        except cc_loader.CcLoaderError as exc:
            report["errors"].append(f"{sig}: {exc}")
            report["ok"] = False
            continue
        want = _expected(model, model_input, meta)
        tol = rtol * max(1.0, float(np.max(np.abs(want["scores"]))) if want["scores"].size else 1.0)
        report["checks"].extend(_compare(sig, want, got, tol))
    report["checks"].append(_check_refuses_nan(run, regions))
    if OPEN_SIDED_SIGNATURE in report["signatures"]:
        report["checks"].extend(_check_open_signatures(run, model, regions, meta, rtol))
    _check_metadata_signature(run, meta, report)
    if saved_model_cli:
        report["saved_model_cli"] = run_saved_model_cli(export_dir)
        if not report["saved_model_cli"]["ok"] and "skipped" not in report["saved_model_cli"]:
            report["errors"].append("saved_model_cli show --all failed")
    report["ok"] = report["ok"] and not report["errors"] and all(c["ok"] for c in report["checks"])
    return report


def _check_open_signatures(run, model, regions, meta: dict, rtol: float) -> list:
    """``serving_open_sided`` given the served classes' rows and sides answers what ``serving_default`` answers;
    ``serving_open`` with the same rows answers the all-unseen margin; both refuse a wrong attribute count."""
    from keras import ops

    from msdn_tf.serving import cc_loader

    att = np.asarray(ops.convert_to_numpy(model.embedding.att), np.float32)
    is_seen = np.zeros((att.shape[0],), bool)
    is_seen[np.asarray(meta["seen_classes"], np.int64)] = True
    rows = []
    try:
        got = run(OPEN_SIDED_SIGNATURE, {"features": regions, "class_attributes": att, "class_is_seen": is_seen})
        want = _expected(model, regions, meta)
        # The open signatures normalise the given rows in the graph: the same values up to float32
        # rounding, which a half-precision model (mixed_bfloat16 / mixed_float16) rounds once more to
        # its compute dtype; their tolerance is that dtype's resolution (2^-7 for bfloat16, 2^-10 float16).
        half = {"bfloat16": 2.0**-7, "float16": 2.0**-10}.get(str(getattr(model, "compute_dtype", "float32")), 0.0)
        tol = max(rtol, 2.0 * half) * max(1.0, float(np.max(np.abs(want["scores"]))) if want["scores"].size else 1.0)
        rows.extend(_compare(OPEN_SIDED_SIGNATURE, want, got, tol))
        got_all = run(OPEN_SIGNATURE, {"features": regions, "class_attributes": att})
        unseen_meta = meta | {"seen_classes": [], "unseen_classes": list(range(att.shape[0]))}
        shift = 2.0 * float(ops.convert_to_numpy(model.bias)) * is_seen.astype(np.float64)
        want_all = reference_predictions(
            want["scores"] + shift[None, :],
            [],
            unseen_meta["unseen_classes"],
            0.0,
            meta["top_k"],
            want["attribute_scores"],
            meta.get("top_attributes", 0),
        )
        want_all["_calibrated"] = want_all["scores"].astype(np.float64)
        rows.extend(_compare(OPEN_SIGNATURE, want_all, got_all, tol))
    except cc_loader.CcLoaderError as exc:
        rows.append({"signature": OPEN_SIDED_SIGNATURE, "output": "runs", "ok": False, "detail": str(exc)[:300]})
        return rows
    row = {"signature": OPEN_SIGNATURE, "output": "refuses a wrong attribute count"}
    try:
        run(OPEN_SIGNATURE, {"features": regions, "class_attributes": att[:, :-1]})
        rows.append(row | {"ok": False, "detail": "answered with status OK"})
    except (cc_loader.CcLoaderError, Exception) as exc:  # noqa: BLE001 - the Python fallback raises TF errors
        ok = "wrong attribute count in input class_attributes" in str(exc)
        rows.append(row | {"ok": ok, "detail": "InvalidArgumentError" if ok else str(exc)[:200]})
    return rows


def _regions_and_maps(sample_features):
    """``(regions (B, R, F), maps (B, H, W, F) or None)`` from either layout (maps only when R is a square)."""
    x = np.asarray(sample_features, np.float32)
    if x.ndim == 4:
        return x.reshape(x.shape[0], -1, x.shape[-1]), x
    if x.ndim == 3:
        side = int(round(np.sqrt(x.shape[1])))
        return x, (x.reshape(x.shape[0], side, side, x.shape[-1]) if side * side == x.shape[1] else None)
    raise MSDNError(f"sample_features must be (B, R, F) or (B, H, W, F), got shape {x.shape}")


def _signature_runner(export_dir: Path, binary: Optional[str], report: dict):
    """``run(signature, inputs) -> outputs`` through the C++ loader, or TF's Python loader when the
    C++ one cannot be built here; fills ``report["signatures"]`` (and ``loader`` on the fallback).

    Raises:
        cc_loader.CcLoaderError: the C++ loader refused the export.
    """
    from msdn_tf.serving import cc_loader

    try:
        binary = binary or cc_loader.compile_loader()
        info = cc_loader.inspect_saved_model(export_dir, binary=binary)
        report["signatures"] = info["signatures"]
        return lambda sig, inputs: cc_loader.run_signature(export_dir, sig, inputs, binary=binary)
    except cc_loader.CcLoaderUnavailable as exc:
        import tensorflow as tf

        report["loader"] = f"python (C++ loader unavailable: {exc})"
        loaded = tf.saved_model.load(str(export_dir), tags=["serve"])
        report["signatures"] = {
            k: {"inputs": sorted(v.structured_input_signature[1]), "outputs": sorted(v.structured_outputs)}
            for k, v in loaded.signatures.items()
        }

        def run_python(sig, inputs):
            fn = loaded.signatures[sig]
            feeds = {
                k: tf.constant(v) if not isinstance(v, list) else tf.constant(v, tf.string) for k, v in inputs.items()
            }
            return {k: np.asarray(v) for k, v in fn(**feeds).items()}

        return run_python


def _images_case(backbone, sample_images, meta: dict):
    """``(signature, inputs, model input)`` for ``serving_images``: the backbone's maps of the images."""
    import keras
    import tensorflow as tf

    images = list(sample_images) if sample_images is not None else synthetic_images()
    size = int(meta["images"]["image_size"])
    pre = preprocess_image_batch(
        tf.constant(images, tf.string), size, meta["images"].get("preprocessing_kind", "keras")
    )
    feats = backbone(pre, training=False) if isinstance(backbone, keras.layers.Layer) else backbone(pre)
    return IMAGES_SIGNATURE, {"images": images}, feats


def _check_metadata_signature(run, meta: dict, report: dict) -> None:
    """The ``metadata`` signature must return the export's class names and metadata JSON."""
    from msdn_tf.serving import cc_loader

    try:
        got = run(METADATA_SIGNATURE, {})
        names = [b.decode("utf-8") for b in np.asarray(got["class_names"]).reshape(-1)]
        text = np.asarray(got["metadata_json"]).reshape(-1)[0]
        ok = names == meta["class_names"] and json.loads(text)["gamma"] == meta["gamma"]
        report["checks"].append({"signature": METADATA_SIGNATURE, "output": "class_names+metadata_json", "ok": ok})
    except (cc_loader.CcLoaderError, KeyError, ValueError) as exc:
        report["errors"].append(f"{METADATA_SIGNATURE}: {exc}")


def report_markdown(report: dict) -> str:
    """A short markdown rendering of a :func:`verify_export` report."""
    from msdn_tf.utils import markdown_table

    lines = [
        f"# Export check: {report['export_dir']}",
        "",
        f"- result: {'OK' if report['ok'] else 'FAILED'}",
        f"- loader: {report['loader']}",
    ]
    if "published" in report:
        lines.append(
            f"- checked as {report['checked_as']} before publishing; "
            + (
                "published"
                if report["published"]
                else "NOT published: the folder was removed, TF Serving sees no new version"
            )
        )
    for name, sig in sorted(report["signatures"].items()):
        ins = ", ".join(
            f"{k} {v['dtype']} {v['shape']}" if isinstance(v, dict) else str(k)
            for k, v in (sig["inputs"].items() if isinstance(sig["inputs"], dict) else [(s, s) for s in sig["inputs"]])
        )
        lines.append(f"- signature `{name}`: inputs {ins or '(none)'}; outputs {', '.join(sorted(sig['outputs']))}")
    cli = report.get("saved_model_cli")
    if cli:
        lines.append(
            f"- saved_model_cli show --all: {'ok' if cli['ok'] else cli.get('skipped', 'FAILED')}, "
            f"signatures {cli['signatures']}"
        )
    rows = []
    for c in report["checks"]:
        detail = (
            f"max abs diff {c['max_abs_diff']:.3g} (tol {c['tolerance']:.3g})"
            if "max_abs_diff" in c
            else f"{c.get('mismatches', 0)} mismatches ({c.get('mismatches_beyond_ties', 0)} beyond ties)"
            if "mismatches" in c
            else c.get("detail", "")
        )
        rows.append([c["signature"], c["output"], "ok" if c["ok"] else "FAIL", detail])
    lines += ["", markdown_table(["signature", "output", "result", "detail"], rows)]
    if report["errors"]:
        lines += ["", "Errors:"] + [f"- {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"
