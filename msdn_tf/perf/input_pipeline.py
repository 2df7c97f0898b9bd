"""Input-pipeline benchmark on a benchmark-sized feature cache (library).

:func:`run` is what the command ``python -m msdn_tf.bench_input`` runs::

    python -m msdn_tf.bench_input --shape awa2|cub [--dir /tmp/msdn-bench] [--steps 200]
        [--fraction 1.0] [--mode pread|memmap] [--cold] [--delete]

Generates (once) a channel-last float16 cache of the given shape (AWA2: 37,322 x
196 x 2048 = 30 GB; CUB: 11,788 x 196 x 2048 = 9.5 GB), written in chunks, never
held in memory; ``--fraction`` keeps only that share of the images (when disk
space is short). Then runs the real :func:`msdn_tf.data.pipeline.train_dataset`
with the dataset's samplers (uniform random batches of 50, and class-balanced
batches: AWA2 40 classes x 1, CUB 50 classes x 1) and prints one JSON object:
images/s, peak RSS (``ru_maxrss``) and the RSS sampled during the run (anonymous
and file-backed parts).

"warm" runs the same steps a second time, so the rows they read are in the page
cache (if they fit in RAM); "cold" (``--cold``, needs root) drops the page cache
first (``echo 3 > /proc/sys/vm/drop_caches``).
"""

from __future__ import annotations

import os
import resource
import shutil
import threading
import time

import numpy as np

from msdn_tf.data.datasets import BENCHMARKS
from msdn_tf.errors import MSDNError

#: ``--shape`` -> (images, regions, channels, classes, seen classes, trainval), from the dataset's
#: entry in :data:`msdn_tf.data.datasets.BENCHMARKS`.
SHAPES = {
    f.name: (f.images, f.regions, f.feature_dim, f.classes, f.seen_classes, f.trainval)
    for f in (BENCHMARKS["awa2"], BENCHMARKS["cub"])
}
CHUNK = 128


def _rss_parts() -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) * 1024
    return out


class RssMonitor:
    """Samples the process RSS every ``interval`` seconds on a thread; keeps the maxima."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for k, v in _rss_parts().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _gb(x) -> float:
    return round(x / 2**30, 3)


def generate(path: str, n: int, r: int, f: int, seed: int = 0, progress: bool = True) -> str:
    """Write a synthetic normalised float16 cache of ``(n, r, f)`` in chunks (never all in memory).

    Rows are drawn from a pool of random normalised rows, and element ``[0, 0]`` of
    every row is set to ``row / n`` so reads can be checked.
    """
    from msdn_tf.data.cache import normalize_regions, write_cache

    rng = np.random.default_rng(seed)
    pool = normalize_regions(np.abs(rng.standard_normal((64, r, f), dtype=np.float32))).astype(np.float16)

    def read_chunk(start, stop):
        rows = pool[(np.arange(start, stop) * 7) % pool.shape[0]].copy()
        rows[:, 0, 0] = (np.arange(start, stop) / n).astype(np.float16)
        return rows

    return write_cache(
        path,
        (n, r, f),
        read_chunk,
        dtype="float16",
        chunk_rows=CHUNK,
        normalize=False,
        source={"synthetic": True, "seed": seed},
        progress=progress,
    )


def synthetic_data(cache: str, shape: str, n: int, seed: int = 0):
    """A :class:`ZSLData` over the generated cache with the benchmark's class structure."""
    from msdn_tf.data.base import ZSLData
    from msdn_tf.data.cache import MemmapFeatures
    from msdn_tf.data.demo import make_splits

    facts = BENCHMARKS[shape]
    c, seen = facts.classes, facts.seen_classes
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, c, size=n))
    labels[:c] = np.arange(c)  # every class present
    labels = rng.permutation(labels)
    splits = make_splits(
        rng, labels, np.arange(seen), np.arange(seen, c), facts.test_seen / (facts.trainval + facts.test_seen)
    )
    k = facts.attributes
    return ZSLData(
        name=f"bench-{shape}",
        features=MemmapFeatures(cache),
        labels=labels,
        trainval_loc=splits["trainval_loc"],
        test_seen_loc=splits["test_seen_loc"],
        test_unseen_loc=splits["test_unseen_loc"],
        att=rng.random((c, k)),
        w2v=rng.random((k, facts.word_dim)),
        class_names=[f"c{i}" for i in range(c)],
        attribute_names=[f"a{i}" for i in range(k)],
        source=cache,
    )


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def measure(data, sampler, start: int, steps: int, parallel_reads: int, prefetch: int) -> dict:
    """Iterate the real train_dataset for ``steps`` steps; images/s over the whole pass."""
    from msdn_tf.data.pipeline import train_dataset

    ds = train_dataset(data, sampler, start, steps, prefetch=prefetch, parallel_reads=parallel_reads)
    images, t0, c0 = 0, time.perf_counter(), time.process_time()
    first = None
    for _x, y in ds:
        images += int(y.shape[0])
        if first is None:
            first = time.perf_counter() - t0
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "steps": steps,
        "images": images,
        "seconds": round(dt, 3),
        "images_per_s": round(images / dt, 1),
        "first_batch_s": round(first or 0.0, 3),
        "cpu_seconds": round(cpu, 3),
        "images_per_cpu_s": round(images / cpu, 1),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "MB_per_s_fp16": round(images * data.num_regions * data.feature_dim * 2 / dt / 1e6, 1),
    }


def check_read_back(data, n: int, path: str) -> None:
    """Raise :class:`MSDNError` unless rows ``n - 1`` and 3 of the cache read back as :func:`generate` wrote them.

    ``generate`` sets element ``[0, 0]`` of row ``i`` to ``i / n``; a cache left by another
    run (or damaged) is named, with what was read and what was expected.
    """
    check = np.asarray(data.features.read(np.array([n - 1, 3])))[:, 0, 0].astype(np.float64)
    expected = np.array([(n - 1) / n, 3 / n])
    if not np.all(np.abs(check - expected) < 1e-3):
        raise MSDNError(
            f"{path}: rows {n - 1} and 3 read back as {check.round(4).tolist()}, expected about "
            f"{expected.round(4).tolist()}: the cache is not what this benchmark wrote; delete it and run again"
        )


def run(args) -> dict:
    from msdn_tf.data.pipeline import ClassBalancedSampler, RandomBatchSampler

    full_n, r, f, _, seen, _ = SHAPES[args.shape]
    n = max(1000, int(round(full_n * args.fraction)))
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"bench_{args.shape}_{n}.regions_float16.npy")
    need = n * r * f * 2
    result = {
        "shape": args.shape,
        "images": n,
        "regions": r,
        "channels": f,
        "fraction": args.fraction,
        "cache": path,
        "cache_GiB": _gb(need),
        "mode": args.mode,
        "parallel_reads": args.parallel_reads,
        "ram_GiB": _gb(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
    }
    from msdn_tf.data.cache import cache_status

    if not cache_status(path, None, "float16")[0]:
        free = shutil.disk_usage(args.dir).free
        if free < need + 5 * 2**30:
            raise MSDNError(
                f"{args.dir} has {_gb(free)} GB free, the cache needs {_gb(need)} GB "
                "(+5 GB margin); pass a smaller --fraction"
            )
        t0 = time.perf_counter()
        generate(path, n, r, f, progress=not args.quiet)
        result["generate_s"] = round(time.perf_counter() - t0, 1)
        result["generate_MB_per_s"] = round(need / 1e6 / (time.perf_counter() - t0), 1)
    data = synthetic_data(path, args.shape, n)
    data.features.mode = args.mode
    check_read_back(data, n, path)

    samplers = {
        "random": RandomBatchSampler(data.trainval_loc, 50, seed=1),
        "class_balanced": ClassBalancedSampler(data.trainval_loc, data.labels, 50, seed=1),
    }
    result["batch_sizes"] = {k: int(s.batch(0).size) for k, s in samplers.items()}
    runs = {}
    with RssMonitor() as mon:
        for name, sampler in samplers.items():
            entry = {}
            start = 10_000 * (1 + len(runs))  # a step range of its own per sampler
            if args.cold:
                entry["cold_dropped_caches"] = drop_caches()
                entry["cold"] = measure(data, sampler, start, args.steps, args.parallel_reads, args.prefetch)
            else:
                measure(data, sampler, start, args.steps, args.parallel_reads, args.prefetch)  # fills the cache
            entry["warm"] = measure(data, sampler, start, args.steps, args.parallel_reads, args.prefetch)
            runs[name] = entry
    result["runs"] = runs
    result["rss_sampled_peak_GiB"] = {k: _gb(v) for k, v in mon.peak.items()}
    result["ru_maxrss_GiB"] = _gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if args.delete:
        for p in (path, path + ".json"):
            if os.path.exists(p):
                os.remove(p)
        result["deleted"] = True
    return result
