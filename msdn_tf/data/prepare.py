"""Prepare the feature cache of a dataset: ``python -m msdn_tf.prepare --dataset awa2 --data-dir DIR``.

Finds the dataset's feature file exactly as training does (the reference
``feature_map_ResNet_101_{DS}.hdf5``, or ``data.feature_file`` of the xlsa17
layout; see docs/data.md), checks the metadata, and converts the features into
a channel-last, per-region L2-normalised float16 (or float32) ``.npy`` cache
with a JSON sidecar (:mod:`msdn_tf.data.cache`). Training then reads it with
``--set data.cache=true`` (same ``data.cache_dir``/``data.cache_dtype``).

Memory stays bounded (rows are converted in chunks); the cache appears only
when complete. Running it again does nothing if the cache is up to date.
"""

from __future__ import annotations

import os
import sys

from msdn_tf.errors import MSDNError


def prepare(config, rebuild: bool = False, progress: bool = True, log=None) -> dict:
    """Build (or check) the cache of ``config.data``'s dataset; returns a summary dict."""
    from msdn_tf.data.cache import cache_path_for, cache_status, read_sidecar
    from msdn_tf.data.registry import load_dataset

    log = log or (lambda msg: print(msg, file=sys.stderr))
    config.data.cache = False
    data = load_dataset(config)  # validates the metadata and the expected sizes first
    source = getattr(data.features, "path", None)
    if source is None or str(source).lower().endswith(".npy"):
        raise MSDNError(f"{data.source}: the features are not read from an HDF5 feature file; nothing to prepare")
    path = cache_path_for(source, config.data.cache_dir, config.data.cache_dtype)
    ok, reason = cache_status(path, source, config.data.cache_dtype)
    if ok and not rebuild:
        log(f"msdn-tf: {path} is up to date")
    from msdn_tf.data.cache import ensure_cache

    cached = ensure_cache(
        source, config.data.cache_dir, config.data.cache_dtype, rebuild=rebuild, progress=progress, log=log
    )
    if tuple(cached.shape) != tuple(data.features.shape):
        raise MSDNError(f"{cached.path}: shape {cached.shape} differs from the source {data.features.shape}")
    return {
        "dataset": config.data.dataset,
        "source": source,
        "cache": cached.path,
        "was_up_to_date": bool(ok and not rebuild),
        "reason": reason,
        "shape": list(cached.shape),
        "dtype": cached.dtype.name,
        "bytes": os.path.getsize(cached.path),
        "sidecar": read_sidecar(cached.path),
    }
