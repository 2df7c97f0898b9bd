"""TensorFlow against JAX in ONE run: two worker processes timed in turn, repeat by repeat.

Keras fixes its backend when it is imported, so one process cannot time both
backends. :func:`compare_backends` starts one worker process per backend
(``KERAS_BACKEND`` set in each); every worker builds the model, compiles its
steps (``--warmup`` untimed calls) and then waits. For each repeat the driver
asks each worker in turn to time its training and evaluation steps; while one
worker measures, the other is blocked reading its pipe, so the two see the same
machine load within a repeat, and the speed ratio is taken per repeat (then the
median), as :func:`msdn_tf.perf.model_speed.time_interleaved` does inside one
process.

On JAX the training step is the on-device loop's multi-step function
(``--loop-steps`` steps per dispatch, :mod:`msdn_tf.training.jax_loop`); on
TensorFlow it is ``model.train_function``, as ``fit`` runs it. The report gives
images/s per backend and ``ratio`` = JAX images/s / TensorFlow images/s.

The driver imports neither Keras nor a backend; the command is
``python -m msdn_tf.bench --compare-backends tensorflow jax``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from msdn_tf.errors import MSDNError
from msdn_tf.perf.pipe_worker import PipeWorker

WORKER_CODE = "from msdn_tf.perf.backend_compare import worker; worker()"
SHAPE_KEYS = ("batch", "eval_batch", "attributes", "classes", "unseen", "features", "embed")


def _default_variant(backend: str) -> str:
    return "fused:jit:float32" if backend == "jax" else "fused:nojit:float32"


def worker() -> None:  # pragma: no cover - runs in the subprocess of compare_backends
    """The worker loop: read the settings (one JSON line), build, warm up, then time on request.

    Protocol on stdin/stdout, one JSON object per line: the driver sends the settings;
    the worker answers ``{"ready": ...}``; then each ``"time"`` line is answered with
    ``{"train": s, "eval": s}`` (seconds per step of this repeat); ``"quit"`` ends it.
    """
    import argparse

    from msdn_tf.perf import model_speed

    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed must not break the protocol
    settings = json.loads(sys.stdin.readline())
    args = argparse.Namespace(**settings["args"])
    variant = model_speed.resolve_variant_precision(model_speed.parse_variant(settings["variant"]))
    x_train, y_train, x_eval = model_speed.bench_inputs(settings["regions"], args)
    fns = model_speed._variant_fns(variant, settings["regions"], args, x_train, y_train, x_eval)
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    info = model_speed._backend_info()
    out.write(json.dumps({"ready": True, "machine": info, "precision": variant["policy"]}) + "\n")
    out.flush()
    for line in sys.stdin:
        if line.strip() != "time":
            break
        seconds = {}
        for mode, fn in fns.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            seconds[mode] = (time.perf_counter() - start) / args.steps / getattr(fn, "steps_per_call", 1)
        out.write(json.dumps(seconds) + "\n")
        out.flush()


def _worker(backend: str, settings: dict) -> PipeWorker:
    """A worker process for ``backend`` (``KERAS_BACKEND`` set), sent its settings."""
    from msdn_tf.utils import subprocess_env

    env = subprocess_env()
    env["KERAS_BACKEND"] = backend
    worker = PipeWorker(
        [sys.executable, "-c", WORKER_CODE],
        f"the {backend} benchmark worker",
        env=env,
        hint=f" (run KERAS_BACKEND={backend} python -m msdn_tf.bench to see why)",
    )
    worker.send(settings)
    return worker


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def compare_shape(regions: int, args, backends, log=None) -> dict:
    """Time ``backends`` (e.g. ``["tensorflow", "jax"]``) at one region count, repeat by repeat."""
    common = {k: getattr(args, k) for k in SHAPE_KEYS}
    common.update(steps=args.steps, warmup=args.warmup, loop_steps=args.loop_steps, jit=None)
    workers = {}
    try:
        for backend in backends:
            settings = {"regions": regions, "variant": _default_variant(backend), "args": common}
            workers[backend] = _worker(backend, settings)
        # All built and warmed up (compiled):
        ready = {backend: w.receive_json(what="starting") for backend, w in workers.items()}
        seconds = {backend: {"train": [], "eval": []} for backend in workers}
        for repeat in range(args.repeats):
            for backend, w in workers.items():
                w.send("time")
                for mode, s in w.receive_json().items():
                    seconds[backend][mode].append(s)
            if log:
                log(f"R={regions} repeat {repeat + 1}/{args.repeats} done")
    finally:
        for w in workers.values():
            w.close()
    images = {"train": args.batch, "eval": args.eval_batch}
    result = {"regions": regions, "backends": {}}
    for backend in backends:
        entry = {
            "variant": _default_variant(backend),
            "precision": ready[backend]["precision"],
            "steps_per_dispatch": args.loop_steps if backend == "jax" else 1,
            "machine": ready[backend]["machine"],
        }
        for mode in ("train", "eval"):
            t = seconds[backend][mode]
            entry[mode] = {
                "images_per_s_median": images[mode] / statistics.median(t),
                "images_per_s_best": images[mode] / min(t),
                "step_s_all": [round(x, 5) for x in t],
            }
        result["backends"][backend] = entry
    if len(backends) == 2:
        base, other = backends
        result["ratio"] = {
            "of": f"{other} images/s / {base} images/s, per repeat, median",
            **{
                mode: statistics.median(b / o for b, o in zip(seconds[base][mode], seconds[other][mode]))
                for mode in ("train", "eval")
            },
            "all": {
                mode: [round(b / o, 3) for b, o in zip(seconds[base][mode], seconds[other][mode])]
                for mode in ("train", "eval")
            },
        }
    return result


def compare_backends(args, command: str | None = None, log=None) -> dict:
    """The report of ``python -m msdn_tf.bench --compare-backends A B``: every ``args.regions``, both backends.

    Args:
        args: the parsed flags of ``python -m msdn_tf.bench`` (``compare_backends``
            names the backends; the shape, ``steps``, ``repeats``, ``warmup`` and
            ``loop_steps`` flags apply to both).
        command: the command line to record.
        log: a function for progress lines (``None``: quiet).

    Returns:
        ``{"command", "config", "load_before", "load_after", "shapes": [...], "wall_s"}``;
        each shape has ``backends`` and, for two backends, ``ratio`` (second / first).

    Example:
        >>> from msdn_tf.cli.bench import build_parser
        >>> compare_backends(build_parser().parse_args(["--compare-backends", "tensorflow", "jax"]))
    """
    from msdn_tf.backend import SUPPORTED

    backends = list(args.compare_backends)
    unknown = [b for b in backends if b not in SUPPORTED]
    if unknown or len(set(backends)) != len(backends):
        raise MSDNError(f"--compare-backends: expected distinct backends among {sorted(SUPPORTED)}, got {backends}")
    started = time.time()
    load_before = _load()
    shapes = [compare_shape(r, args, backends, log) for r in args.regions]
    return {
        "command": command,
        "config": {
            "backends": backends,
            **{k: getattr(args, k) for k in SHAPE_KEYS},
            "regions": list(args.regions),
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "loop_steps": args.loop_steps,
        },
        "cpu_count": os.cpu_count(),
        "load_before": load_before,
        "load_after": _load(),
        "shapes": shapes,
        "wall_s": round(time.time() - started, 1),
    }


def report_text(report: dict) -> str:
    """A short readable table of :func:`compare_backends`' report (what the command prints without ``--json``).

    One row per region count and backend: training and evaluation images/s (median) and,
    for two backends, the second's speed over the first's (median of per-repeat ratios,
    with their range).

    Example:
        >>> print(report_text(compare_backends(args)))
    """
    lines = [
        f"load {report['load_before']} -> {report['load_after']}, {report.get('cpu_count')} CPUs",
        f"{'R':>4}  {'backend':<11} {'variant':<22} {'steps/call':>10} {'train img/s':>11} {'eval img/s':>10}",
    ]
    for shape in report["shapes"]:
        for backend, entry in shape["backends"].items():
            lines.append(
                f"{shape['regions']:>4}  {backend:<11} {entry['variant']:<22} {entry['steps_per_dispatch']:>10} "
                f"{entry['train']['images_per_s_median']:>11.1f} {entry['eval']['images_per_s_median']:>10.1f}"
            )
        ratio = shape.get("ratio")
        if ratio:
            spread = {m: (min(ratio["all"][m]), max(ratio["all"][m])) for m in ("train", "eval")}
            lines.append(
                f"{shape['regions']:>4}  {ratio['of']}: train {ratio['train']:.2f}x "
                f"({spread['train'][0]:.2f}-{spread['train'][1]:.2f}), eval {ratio['eval']:.2f}x "
                f"({spread['eval'][0]:.2f}-{spread['eval'][1]:.2f})"
            )
    lines.append(f"({report['wall_s']} s; --json for the full report: every repeat, both machines)")
    return "\n".join(lines)
