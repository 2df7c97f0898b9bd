"""The custom-data workflow: your own attribute-annotated images, end to end (library).

What ``python -m msdn_tf.custom`` calls (format and walkthrough: ``docs/custom_data.md``):

* ``prepare`` is :func:`prepare`: :func:`msdn_tf.data.custom.prepare_dataset` with the flags and an
  optional ``dataset.yaml`` (:func:`prepare_options`);
* ``run`` is :func:`run_custom`: the benchmark code (:func:`msdn_tf.training.loop.run_training`,
  :func:`msdn_tf.evaluation.report.evaluate_run`,
  :func:`msdn_tf.serving.export.export_saved_model`) on the ``custom`` entry of the dataset table;
* ``example`` is :func:`run_example`: generated coloured shapes (:func:`make_shapes_dataset`),
  prepare -> run -> a query through the local gRPC test double (:func:`query_local_server`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import msdn_tf.data.custom as custom_data
from msdn_tf.errors import MSDNError


def log_stderr(msg: str) -> None:
    """The default progress log: one line to stderr (stdout carries the JSON)."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# run = train + evaluate + export (+ attention figure)


def _next_version(base: Path) -> int:
    versions = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


# prepare options that may also come from a dataset.yaml (--spec); path-valued ones are
# resolved relative to the YAML file's folder.
SPEC_KEYS = {
    "images": True,
    "csv": True,
    "images_root": True,
    "attributes": True,
    "unseen": True,
    "unseen_fraction": False,
    "seed": False,
    "attribute_vectors": True,
    "word_vectors": True,
    "allow_missing_words": False,
    "allow_zero_vectors": False,
    "test_seen_fraction": False,
    "val_fraction": False,
    "weights": False,
    "image_size": False,
    "batch_size": False,
}
EXCLUSIVE = (("images", "csv"), ("unseen", "unseen_fraction"), ("attribute_vectors", "word_vectors"))
PREPARE_DEFAULTS = {
    "seed": 0,
    "test_seen_fraction": 0.2,
    "val_fraction": 0.0,
    "weights": "imagenet",
    "image_size": 448,
    "batch_size": 16,
    "allow_missing_words": False,
    "allow_zero_vectors": False,
}


def prepare_options(flags: dict, spec=None) -> dict:
    """Keyword arguments of :func:`~msdn_tf.data.custom.prepare_dataset` from the ``prepare`` flags
    (``flags``: option name -> value, ``None`` when not given) and an optional ``--spec`` YAML
    (flags win)."""
    opts = {k: flags.get(k) for k in SPEC_KEYS}
    if spec:
        from msdn_tf.config import load_yaml

        spec_path = Path(spec)
        try:
            spec = load_yaml(spec_path)
        except MSDNError as exc:
            raise MSDNError(f"--spec: {exc}") from exc
        for key, value in spec.items():
            k = str(key).replace("-", "_")
            if k not in SPEC_KEYS:
                raise MSDNError(f"{spec_path}: unknown key {key!r}; known keys: {', '.join(SPEC_KEYS)}")
            rivals = next((g for g in EXCLUSIVE if k in g), (k,))
            if opts[k] in (None, False) and all(flags.get(r) is None for r in rivals if r != k):
                opts[k] = str(spec_path.parent / value) if SPEC_KEYS[k] and value is not None else value
    for k, v in PREPARE_DEFAULTS.items():
        if opts[k] is None:
            opts[k] = v
    if opts["attributes"] is None:
        raise MSDNError("prepare needs --attributes FILE.csv (class x attribute table)")
    opts["csv_file"] = opts.pop("csv")
    return opts


def prepare(out, flags: dict, spec=None, *, overwrite=False, restart=False, progress=True) -> dict:
    """``python -m msdn_tf.custom prepare``: :func:`~msdn_tf.data.custom.prepare_dataset` with the
    options of :func:`prepare_options`; returns the summary the command prints."""
    opts = prepare_options(flags, spec)
    manifest = custom_data.prepare_dataset(out, **opts, overwrite=overwrite, restart=restart, progress=progress)
    vectors = manifest["attribute_vectors"]
    return {
        "data_dir": str(out),
        **manifest["sizes"],
        "unseen": manifest["unseen_classes"],
        "missing_words": sorted(vectors.get("missing_words", {})),
        "zero_attributes": vectors.get("zero_attributes", []),
    }


def run_custom(
    data_dir,
    out,
    *,
    config_files=(),
    overrides=(),
    export_dir=None,
    export: bool = True,
    with_images: bool = True,
    gamma: float = 0.0,
    top_k: int = 5,
    verify_export: bool = False,
    visualize: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = print,
    flags=(),
    overwrite: bool = False,
) -> dict:
    """Train, evaluate and export MSDN on a prepared folder (the ``custom`` dataset).

    Args:
        data_dir: a folder written by ``prepare``.
        out: the run directory.
        config_files, overrides: extra YAML files and ``section.key=value`` strings applied
            after ``configs/custom.yaml``.
        flags: ``(section.key, value, flag)`` of command flags, set as typed values
            (:func:`msdn_tf.config.flag_values`).
        export_dir: TF Serving model base path (default ``out/export``); a new version
            folder is added (1, 2, ...).
        export: export at all (needs :mod:`msdn_tf.serving.export`).
        with_images: add the ``serving_images`` signature when the backbone of the prepared
            features can be rebuilt here (``--weights none`` or a weights file, or ImageNet
            weights with network).
        gamma, top_k: baked into the export (calibrated stacking, top-k outputs).
        verify_export: check the export with TF's C++ loader against the Keras model
            before it is published (slow); a failed check publishes nothing and sets
            ``export_check_ok`` False (``run`` then exits 1).
        visualize: write an attention figure of one unseen test image.
        resume: continue a run interrupted during training.
        overwrite: replace a run already in ``out``.

    Returns:
        ``{"run_dir", "train": final figures, "evaluate": metrics, "export_dir", "signatures", ...}``.
    """
    from msdn_tf.config import resolve_config
    from msdn_tf.data.registry import load_dataset
    from msdn_tf.runlock import RunLock

    data_dir = os.path.abspath(data_dir)
    out = Path(out)
    config = resolve_config(
        "custom", list(config_files), list(overrides), flags=[("data.data_dir", data_dir, "data_dir"), *flags]
    )
    data = load_dataset(config)
    with RunLock(out, "custom run", log):  # one writer, from training to the export
        return _run_custom_locked(
            data_dir,
            out,
            config,
            data,
            export_dir,
            export,
            with_images,
            gamma,
            top_k,
            verify_export,
            visualize,
            resume,
            overwrite,
            log,
        )


def _run_custom_locked(
    data_dir,
    out,
    config,
    data,
    export_dir,
    export,
    with_images,
    gamma,
    top_k,
    verify_export,
    visualize,
    resume,
    overwrite,
    log,
) -> dict:
    from msdn_tf.evaluation.report import evaluate_run
    from msdn_tf.training.loop import run_training
    from msdn_tf.utils import write_json

    timings = {}
    t0 = time.time()
    results = run_training(config, run_dir=out, resume=resume, data=data, log=log, overwrite=overwrite)
    timings["train_s"] = round(time.time() - t0, 2)
    write_json(
        out / "metadata.json",
        {
            "class_names": list(data.class_names),
            "attribute_names": list(data.attribute_names),
            "unseen_classes": [data.class_names[i] for i in data.unseen_classes],
            "data_dir": data_dir,
        },
    )
    t0 = time.time()
    metrics = evaluate_run(out, data=data, gamma=gamma, log=log)
    timings["evaluate_s"] = round(time.time() - t0, 2)
    summary = {
        "run_dir": str(out),
        "data_dir": data_dir,
        "train": {k: results["final"][k] for k in ("step", "acc", "U", "S", "H")},
        "evaluate": {k: metrics[k] for k in ("protocol", "acc", "U", "S", "H")},
        "export_dir": None,
        "signatures": [],
        "timings": timings,
    }
    backbone = size = note = None
    need_backbone = (export and with_images) or visualize
    if need_backbone:
        t0 = time.time()
        backbone, size, note = custom_data.backbone_for_data_dir(data_dir, log=log)
        if backbone is None:
            log(f"msdn-tf custom: no image signature/figure from image files: {note}")
        timings["backbone_s"] = round(time.time() - t0, 2)
    if export:
        t0 = time.time()
        if _export_run(
            out,
            data,
            config,
            summary,
            backbone if with_images else None,
            size,
            note,
            export_dir=export_dir,
            gamma=gamma,
            top_k=top_k,
            verify_export=verify_export,
            log=log,
        ):
            timings["export_s"] = round(time.time() - t0, 2)
    if visualize:
        t0 = time.time()
        summary["attention_figure"] = str(_attention_figure(out, data_dir, backbone, size, log))
        timings["visualize_s"] = round(time.time() - t0, 2)
    write_json(out / "custom_run.json", summary)
    return summary


def _export_run(
    out: Path,
    data,
    config,
    summary: dict,
    use_images,
    size,
    note,
    *,
    export_dir,
    gamma: float,
    top_k: int,
    verify_export: bool,
    log: Callable[[str], None],
) -> bool:
    """Export the run as a new version (checked first with ``verify_export``); fills ``summary``.

    Returns False when the export modules cannot be imported here (the export is skipped).
    """
    try:
        from msdn_tf.serving import export as export_mod
        from msdn_tf.serving import verify as verify_mod
    except ImportError as exc:  # the export module is optional for training
        log(f"msdn-tf custom: msdn_tf.serving.export is not available ({exc}); skipping the export")
        return False
    from msdn_tf.evaluation.runs import load_run_model

    model = load_run_model(out)
    base = Path(export_dir) if export_dir else out / "export"
    version = _next_version(base)
    check, reports = None, []
    if verify_export:  # checked before it is published: a failed export never reaches TF Serving
        sample = data.features.read(data.test_unseen_loc[:3])

        def check(version_dir):
            reports.append(verify_mod.verify_export(version_dir, model, sample, backbone=use_images))
            return reports[-1]

    try:
        path = export_mod.export_saved_model(
            model,
            base,
            version=version,
            class_names=list(data.class_names),
            seen_classes=model.seen_classes,
            unseen_classes=model.unseen_classes,
            gamma=gamma,
            top_k=top_k,
            config=config,
            backbone=use_images,
            image_size=size or 448,
            backbone_id=None if use_images is None else note,
            check=check,
        )
    except export_mod.ExportCheckFailed as exc:
        log(verify_mod.report_markdown(exc.report))
        log(f"msdn-tf custom: {exc}")
        summary["export_check_ok"] = False
        return True
    summary["export_dir"] = str(base)
    summary["export_version_dir"] = path
    summary["signatures"] = ["serving_default", "serving_maps", "metadata"] + (
        ["serving_images"] if use_images is not None else []
    )
    log(f"msdn-tf custom: exported {path} (signatures {', '.join(summary['signatures'])})")
    if reports:
        summary["export_check_ok"] = True
        log(verify_mod.report_markdown(reports[-1]))
    return True


def _attention_figure(out: Path, data_dir, backbone, size, log: Callable[[str], None]) -> Path:
    """The attention figure of the prepared probe image (or of test_unseen row 0 without a backbone)."""
    from msdn_tf.viz.run_figures import visualize_attention

    fig = out / "attention_test_unseen_0.png"
    if backbone is not None:
        probe = custom_data.read_manifest(data_dir)["probe"]
        visualize_attention(
            out,
            image=probe["path"],
            backbone=backbone,
            image_size=size,
            out=fig,
            true_class=probe.get("class"),
            log=log,
        )
    else:
        visualize_attention(out, index=0, split="test_unseen", out=fig, log=log)
    return fig


# ---------------------------------------------------------------------------------------------
# example: generated coloured shapes

COLOURS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (40, 70, 215)}
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("solid", "striped", "dotted")


def draw_shape(colour: str, shape: str, texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image: a textured shape on a noisy light background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = rng.uniform(0.24, 0.36) * size
    cy, cx = rng.uniform(r + 2, size - r - 2, size=2)
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    elif shape == "square":
        mask = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    else:  # upward triangle
        top, bottom = cy - r, cy + r * 0.8
        half = (yy - top) / (bottom - top) * r
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
    period = max(4, size // 10)
    if texture == "solid":
        ink = mask
    elif texture == "striped":
        phase = rng.integers(0, period)
        ink = mask & (((xx + yy + phase) // (period / 2)) % 2 == 0)
    else:  # dotted
        oy, ox = rng.integers(0, period, size=2)
        dots = ((yy + oy) % period - period / 2) ** 2 + ((xx + ox) % period - period / 2) ** 2 <= (period / 3.2) ** 2
        ink = mask & dots
    img = rng.uniform(205, 245) + rng.normal(0, 6, (size, size, 3))
    img[mask] = 250  # paper colour under the texture
    col = np.asarray(COLOURS[colour], np.float32) + rng.normal(0, 12, 3)
    img[ink] = col + rng.normal(0, 5, (int(ink.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_shapes_dataset(
    folder,
    *,
    num_classes: int = 15,
    num_unseen: int = 4,
    images_per_class: int = 12,
    size: int = 64,
    seed: int = 0,
    vector_dim: int = 50,
) -> dict:
    """Write a small attribute-annotated image set in the ``prepare`` input format.

    ``folder/images/<colour>_<texture>_<shape>/*.png``, ``attributes.csv`` (9 binary
    attributes ``has_color::red`` ... ``has_texture::dotted``), ``unseen.txt`` and
    ``wordvectors.txt``: MADE-UP word vectors (random Gaussian, word2vec text format with
    its header) for the attribute words, plus a few unused filler words. Unseen classes
    are combinations whose colour, shape and texture all occur among the seen classes.

    Returns:
        ``{"images", "attributes", "unseen", "word_vectors", "classes", "unseen_classes"}`` paths/names.
    """
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    combos = [(c, t, s) for c in COLOURS for t in TEXTURES for s in SHAPES]
    for _ in range(1000):
        pick = [combos[i] for i in rng.permutation(len(combos))[:num_classes]]
        unseen = pick[-num_unseen:]
        seen = pick[:-num_unseen]
        if all({v[j] for v in seen} == set(vals) for j, vals in enumerate((COLOURS, TEXTURES, SHAPES))):
            break
    else:
        raise MSDNError("could not draw seen classes covering every colour, texture and shape")
    pick.sort()
    names = ["_".join(c) for c in pick]
    attributes = (
        [f"has_color::{c}" for c in COLOURS]
        + [f"has_shape::{s}" for s in SHAPES]
        + [f"has_texture::{t}" for t in TEXTURES]
    )
    for (colour, texture, shape), name in zip(pick, names):
        d = folder / "images" / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            Image.fromarray(draw_shape(colour, shape, texture, size, rng)).save(d / f"{name}_{i:03d}.png")
    rows = ["class," + ",".join(attributes)]
    for colour, texture, shape in pick:
        row = [colour == c for c in COLOURS] + [shape == s for s in SHAPES] + [texture == t for t in TEXTURES]
        rows.append("_".join((colour, texture, shape)) + "," + ",".join(str(int(v)) for v in row))
    (folder / "attributes.csv").write_text("\n".join(rows) + "\n")
    unseen_names = sorted("_".join(u) for u in unseen)
    (folder / "unseen.txt").write_text("# held-out combinations (zero-shot classes)\n" + "\n".join(unseen_names) + "\n")
    words = ["has", "color", "shape", "texture", *COLOURS, *SHAPES, *TEXTURES, "the", "of", "bird", "wing"]
    vec_rng = np.random.default_rng(seed + 7)
    lines = [f"{len(words)} {vector_dim}"] + [
        w + " " + " ".join(f"{v:.5f}" for v in vec_rng.standard_normal(vector_dim)) for w in words
    ]
    (folder / "wordvectors.txt").write_text("\n".join(lines) + "\n")
    (folder / "dataset.yaml").write_text(
        "# python -m msdn_tf.custom prepare --spec dataset.yaml --out DATA_DIR\n"
        "images: images\nattributes: attributes.csv\nunseen: unseen.txt\nword_vectors: wordvectors.txt\n"
        "seed: 0\ntest_seen_fraction: 0.2\n"
    )
    return {
        "images": str(folder / "images"),
        "attributes": str(folder / "attributes.csv"),
        "unseen": str(folder / "unseen.txt"),
        "word_vectors": str(folder / "wordvectors.txt"),
        "spec": str(folder / "dataset.yaml"),
        "classes": names,
        "unseen_classes": unseen_names,
    }


EXAMPLE_OVERRIDES = (
    "optimizer.learning_rate=0.001",
    "train.iterations=300",
    "train.eval_every=100",
    "data.batch_size=50",
)


def run_example(
    out,
    *,
    image_size: int = 96,
    num_classes: int = 15,
    images_per_class: int = 12,
    seed: int = 0,
    overrides: Sequence[str] = (),
    serve: bool = True,
    top_k: int = 3,
    log: Callable[[str], None] = log_stderr,
) -> dict:
    """Generate shapes -> prepare (untrained ResNet-101) -> run (train, evaluate, export) -> query
    the export through the local gRPC test double of TF Serving. Returns timings and figures."""
    out = Path(out)
    t_all = time.time()
    timings = {}
    t0 = time.time()
    src = make_shapes_dataset(
        out / "source", num_classes=num_classes, images_per_class=images_per_class, size=max(image_size, 64), seed=seed
    )
    timings["generate_s"] = round(time.time() - t0, 2)
    log(
        f"example: {len(src['classes'])} classes x {images_per_class} images in {out / 'source'}; unseen "
        f"{src['unseen_classes']}"
    )
    t0 = time.time()
    data_dir = out / "data"
    custom_data.prepare_dataset(
        data_dir,
        images=src["images"],
        attributes=src["attributes"],
        unseen=src["unseen"],
        word_vectors=src["word_vectors"],
        seed=seed,
        weights="none",
        image_size=image_size,
        batch_size=16,
        overwrite=True,
        restart=True,
        progress=False,
        log=log,
    )
    timings["prepare_s"] = round(time.time() - t0, 2)
    summary = run_custom(
        data_dir,
        out / "run",
        overrides=[*EXAMPLE_OVERRIDES, *overrides],
        export_dir=out / "export" / "msdn_custom",
        top_k=top_k,
        visualize=True,
        log=log,
    )
    timings.update(summary["timings"])
    answer = None
    if serve and summary["export_dir"]:
        answer = query_local_server(summary["export_dir"], data_dir, top_k=top_k, log=log)
        timings["serve_s"] = answer.pop("seconds")
    timings["total_s"] = round(time.time() - t_all, 2)
    result = {
        "out": str(out),
        "image_size": image_size,
        "evaluate": summary["evaluate"],
        "train_final": summary["train"],
        "timings": timings,
        "query": None if answer is None else answer["summary"],
    }
    from msdn_tf.utils import write_json

    write_json(out / "example.json", result)
    return result


def query_local_server(
    export_base, data_dir, *, top_k: int = 3, per_class: int = 1, log: Callable[[str], None] = log_stderr
) -> dict:
    """Start the local gRPC TEST DOUBLE of TF Serving on ``export_base``, send test_unseen images
    (or their features when the export has no image signature) with :mod:`msdn_tf.serving.classify`, print
    the top-k answers."""
    import csv

    from msdn_tf.serving import classify as client
    from msdn_tf.serving.local_server import start_local_server

    t0 = time.time()
    with open(Path(data_dir) / custom_data.IMAGES_FILE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    chosen, per = [], {}
    for i, r in enumerate(rows):
        if r["split"] == "test_unseen" and per.get(r["class"], 0) < per_class:
            per[r["class"]] = per.get(r["class"], 0) + 1
            chosen.append((i, r))
    handle = start_local_server(export_base, "msdn_custom", grpc_port=0)
    try:
        metadata = client.fetch_metadata(model="msdn_custom", server=handle.grpc_address)
        labels = [f"{Path(r['path']).name} (true: {r['class']})" for _, r in chosen]
        has_images = "serving_images" in (metadata.get("signatures") or {})
        if has_images:
            answer = client.classify(
                model="msdn_custom",
                server=handle.grpc_address,
                metadata=metadata,
                top_k=top_k,
                images=client.read_images([r["path"] for _, r in chosen]),
                labels=labels,
            )
        else:
            from msdn_tf.data.hdf5 import HDF5Features

            feats = HDF5Features(str(Path(data_dir) / custom_data.FEATURE_FILE)).read([i for i, _ in chosen])
            answer = client.classify(
                model="msdn_custom",
                server=handle.grpc_address,
                metadata=metadata,
                top_k=top_k,
                features=feats,
                labels=labels,
            )
    finally:
        handle.stop()
    log(client.format_text(answer))
    hits = sum(r["czsl"]["name"] == row["class"] for r, (_, row) in zip(answer["results"], chosen))
    return {
        "summary": {
            "signature": answer["signature"],
            "queries": len(chosen),
            "czsl_correct": int(hits),
            "answers": [
                {"input": r["input"], "czsl": r["czsl"]["name"], "top_k": [t["name"] for t in r["top_k"]]}
                for r in answer["results"]
            ],
        },
        "seconds": round(time.time() - t0, 2),
    }
