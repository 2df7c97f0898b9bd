"""Latency and throughput of an exported MSDN SavedModel on this machine's CPU (library).

:func:`run` (:func:`benchmark`, after a synthetic export with ``--synthetic``) is what the command
``python -m msdn_tf.bench_serving`` runs::

    python -m msdn_tf.bench_serving --export export/models/msdn_cub [--batches 1 64] [--iterations 20]
    python -m msdn_tf.bench_serving --synthetic cub [--batches 1 64] [--iterations 20]

``--export`` takes a model base path (the highest version is used) or a version
folder. ``--synthetic cub`` first exports a randomly initialised MSDN at CUB shapes
(K=312, C=200 with 150 seen / 50 unseen, F=2048, D=300) to a temporary folder;
``--synthetic tiny`` does the same at toy shapes (for smoke tests).

The SavedModel is loaded with ``tf.saved_model.load`` (the Python loader, same
runtime kernels as TF Serving, without its batching or RPC overhead) and its
``serving_default`` signature is called on random non-negative region vectors
``(B, R, F)`` (R=196, the 14x14 maps of 448-pixel images, unless ``--regions``).
Per batch size: ``--warmup`` untimed calls, then ``--iterations`` timed calls.
Prints one JSON object: per batch size p50/p99/mean latency (ms) and
throughput (images/s = batch / mean latency), plus the machine's load average
and CPU count, because the numbers depend on what else is running.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from msdn_tf.data.datasets import BENCHMARKS
from msdn_tf.errors import MSDNError

#: ``--synthetic`` -> (C, K, seen, F, D): CUB's from its entry in
#: :data:`msdn_tf.data.datasets.BENCHMARKS`, and a tiny one for tests.
_CUB = BENCHMARKS["cub"]
SYNTHETIC = {
    "cub": (_CUB.classes, _CUB.attributes, _CUB.seen_classes, _CUB.feature_dim, _CUB.word_dim),
    "tiny": (12, 8, 8, 32, 16),
}


def synthetic_model(shape: str = "cub", seed: int = 0):
    """A randomly initialised MSDN at the named shapes, and its class names."""
    import keras

    from msdn_tf.model import build_msdn

    if shape not in SYNTHETIC:
        raise MSDNError(f"unknown --synthetic {shape!r}; choose from {sorted(SYNTHETIC)}")
    c, k, n_seen, f, d = SYNTHETIC[shape]
    rng = np.random.default_rng(seed)
    att = np.abs(rng.standard_normal((c, k))).astype(np.float32)
    att /= np.linalg.norm(att, axis=1, keepdims=True)
    perm = rng.permutation(c)
    seen, unseen = np.sort(perm[:n_seen]), np.sort(perm[n_seen:])
    model = build_msdn(att, rng.standard_normal((k, d)).astype(np.float32), seen, unseen, feature_dim=f)
    for w in model.trainable_weights:
        w.assign(keras.ops.convert_to_tensor(0.02 * rng.standard_normal(tuple(w.shape)), w.dtype))
    return model, [f"class_{i:03d}" for i in range(c)]


def _version_dir(path: Path) -> Path:
    if (path / "saved_model.pb").is_file():
        return path
    from msdn_tf.serving.local_server import find_latest_version

    try:
        return find_latest_version(path)[1]
    except FileNotFoundError as exc:
        raise MSDNError(str(exc)) from exc


def benchmark(
    export_dir,
    batches: Sequence[int] = (1, 64),
    iterations: int = 20,
    warmup: int = 3,
    regions: int = 196,
    seed: int = 0,
) -> dict:
    """Time ``serving_default`` of ``export_dir`` at each batch size (see the module docstring)."""
    import tensorflow as tf

    export_dir = _version_dir(Path(export_dir))
    t0 = time.perf_counter()
    loaded = tf.saved_model.load(str(export_dir), tags=["serve"])
    load_s = time.perf_counter() - t0
    fn = loaded.signatures["serving_default"]
    spec = fn.structured_input_signature[1]["features"]
    feature_dim = int(spec.shape[-1])
    rng = np.random.default_rng(seed)
    results = []
    for b in batches:
        x = tf.constant(np.abs(rng.standard_normal((int(b), regions, feature_dim))).astype(np.float32))
        for _ in range(warmup):
            fn(features=x)["scores"].numpy()
        times = []
        for _ in range(iterations):
            t = time.perf_counter()
            fn(features=x)["scores"].numpy()
            times.append(time.perf_counter() - t)
        ms = np.asarray(times) * 1e3
        results.append(
            {
                "batch": int(b),
                "iterations": int(iterations),
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
                "mean_ms": float(ms.mean()),
                "images_per_s": float(b / (ms.mean() / 1e3)),
            }
        )
    return {
        "export_dir": str(export_dir),
        "loader": "tf.saved_model.load (Python)",
        "signature": "serving_default",
        "regions": int(regions),
        "feature_dim": feature_dim,
        "load_s": load_s,
        "results": results,
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "tensorflow": tf.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
    }


def run(
    export_dir=None,
    synthetic=None,
    batches: Sequence[int] = (1, 64),
    iterations: int = 20,
    warmup: int = 3,
    regions: int = 196,
) -> dict:
    """What ``python -m msdn_tf.bench_serving`` does: :func:`benchmark` of ``export_dir``, or of a
    :func:`synthetic_model` at the ``synthetic`` shapes exported to a temporary folder first
    (the report then also holds ``synthetic`` and ``export_s``)."""
    if min(batches) < 1 or iterations < 1 or warmup < 0 or regions < 1:
        raise MSDNError("--batches, --iterations and --regions must be >= 1, --warmup >= 0")
    if not synthetic:
        return benchmark(export_dir, batches, iterations, warmup, regions)
    import tempfile

    from msdn_tf.serving.export import export_saved_model

    with tempfile.TemporaryDirectory(prefix="msdn_bench_") as tmp:
        model, names = synthetic_model(synthetic)
        t0 = time.perf_counter()
        path = export_saved_model(
            model,
            Path(tmp) / "model",
            class_names=names,
            seen_classes=model.seen_classes,
            unseen_classes=model.unseen_classes,
        )
        export_s = time.perf_counter() - t0
        report = benchmark(path, batches, iterations, warmup, regions)
        report["synthetic"] = synthetic
        report["export_s"] = export_s
    return report
