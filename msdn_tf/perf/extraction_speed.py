"""Benchmark feature extraction (torchvision ResNet trunk, reference preprocessing) against the machine's conv rate.

The library of ``python -m msdn_tf.bench_extract``. In ONE run, interleaved repeat
by repeat (so every repeat's ratios compare numbers taken under the same load):

* **preprocessing** of a batch of images: Pillow decoding plus the reference's
  Resize/CenterCrop/Normalize, as extraction runs it (:func:`load_and_preprocess`:
  Pillow's own resize in two exact one-axis passes), and as it ran before issue 24
  (the numpy account :func:`~msdn_tf.backbones.preprocessing.pil_resize`), one
  thread, images/s;
* **the network** on one preprocessed batch, per variant: ``before`` (the trunk as
  loaded: convolution, BatchNormalization, ReLU as separate layers), ``float32``
  (:func:`~msdn_tf.backbones.torchvision_resnet.inference_trunk`: BatchNorm folded,
  fused convolutions) and ``auto`` (the same under the precision ``auto`` resolves to
  here, bfloat16 on a CPU with ``avx512_bf16``/``amx_bf16``): images/s, GFLOP/s of the
  convolutions (counted from the layers) and the fraction of the conv rate;
* **the conv rate**: ``tf.nn.conv2d`` at the trunk's most common shape (layer3's 3x3,
  256 -> 256 channels at a 28x28 map for 448 px inputs) in float32 (and bfloat16 for
  a bfloat16 variant), and a 2048^3 ``tf.matmul``;
* **end to end**: the extraction generator itself (decode and preprocess in a thread
  pool one batch ahead, the network, the finiteness check) over two batches, before and
  after.

* **torchvision**, with ``--torch-python PY`` (an interpreter that has ``torch`` and
  ``torchvision``, e.g. a separate virtual environment): a worker process
  (:mod:`msdn_tf.perf.torchvision_worker`) runs torchvision's own ResNet trunk on the
  SAME weights and the same batch (NCHW as the reference runs it, and ``channels_last``),
  and torchvision's own pipeline end to end (its transforms, a thread pool one batch
  ahead, the trunk) on the same images; each is one more timed function of the
  interleaved repeats, so the ratios to it are taken under the same load.

Each variant's features are compared with ``before``'s (relative L2), so the report
says what bfloat16 costs in accuracy; with ``--torch-python`` also with torchvision's
features on the same weights and batch, and the preprocessed batch with torchvision's.
Without ``--weights`` the trunk has seeded random weights (He-initialised convolutions,
BatchNorm statistics drawn near the identity, so the maps stay finite through 33
blocks); with the reference's ``resnet101-63fe2227.pth`` the error figures are the real ones. Without
``--images`` the command writes synthetic 500x375 JPEG photos (CUB's typical size)
to a temporary folder.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import numpy as np

from msdn_tf.errors import MSDNError
from msdn_tf.perf.pipe_worker import PipeWorker, require_executable

VARIANTS = ("before", "float32", "auto", "mixed_bfloat16")
TORCHVISION_COMMANDS = ("net", "net_channels_last", "end_to_end")


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def synthetic_images(folder: str, count: int, size=(500, 375), seed: int = 0) -> list:
    """``count`` smooth random RGB JPEGs of ``size`` (width, height) in ``folder``; their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (size[1] // 25 + 1, size[0] // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BILINEAR)  # smooth, photo-like content
        noise = rng.integers(-12, 13, (size[1], size[0], 3))
        arr = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"img{i:04d}.jpg")
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def list_images(spec: str, count: int) -> list:
    """The first ``count`` images of a folder (sorted) or of an image list file."""
    if os.path.isdir(spec):
        names = sorted(n for n in os.listdir(spec) if n.lower().endswith((".jpg", ".jpeg", ".png")))
        paths = [os.path.join(spec, n) for n in names]
    else:
        from msdn_tf.data.extraction import read_image_list

        paths = read_image_list(spec)[0]
    if len(paths) < count:
        raise MSDNError(f"--images {spec}: {len(paths)} images, the benchmark needs {count} (2 batches)")
    return paths[:count]


def random_trunk(blocks, width: int, image_size: int, seed: int = 0):
    """A torchvision-layout trunk with seeded random weights whose activations stay finite."""
    from msdn_tf.backbones.torchvision_resnet import build_torchvision_resnet

    model = build_torchvision_resnet(blocks, width, image_size=image_size)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if len(weights) == 1:  # a convolution: He initialisation
            k = weights[0]
            fan_in = k.shape[0] * k.shape[1] * k.shape[2]
            layer.set_weights([rng.normal(0, np.sqrt(2.0 / fan_in), k.shape).astype(np.float32)])
        else:  # BatchNormalization: gamma, beta, mean, var near the identity; the last BN of a block small
            n = weights[0].shape[0]
            gamma = rng.uniform(0.1, 0.3, n) if layer.name.endswith("bn3") else rng.uniform(0.8, 1.2, n)
            layer.set_weights(
                [
                    gamma.astype(np.float32),
                    rng.normal(0, 0.05, n).astype(np.float32),
                    rng.normal(0, 0.1, n).astype(np.float32),
                    rng.uniform(0.5, 1.5, n).astype(np.float32),
                ]
            )
    return model


def conv_flops_per_image(model) -> int:
    """FLOPs of every convolution of ``model`` for one image (2 per multiply-add)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            total += 2 * int(h) * int(w) * int(kh) * int(kw) * int(cin) * int(cout)
    return total


def _conv_fn(batch: int, size: int, channels: int, dtype: str):
    import tensorflow as tf

    x = tf.random.uniform((batch, size, size, channels), dtype=tf.float32)
    k = tf.random.uniform((3, 3, channels, channels), dtype=tf.float32) * 0.01
    x, k = tf.cast(x, dtype), tf.cast(k, dtype)

    @tf.function
    def conv(x, k):
        return tf.reduce_sum(tf.cast(tf.nn.conv2d(x, k, 1, "SAME")[:1, :1, :1, :1], tf.float32))

    return (lambda: conv(x, k).numpy()), 2.0 * batch * size * size * 9 * channels * channels


def _matmul_fn(n: int = 2048):
    import tensorflow as tf

    a, b = tf.random.uniform((n, n)), tf.random.uniform((n, n))

    @tf.function
    def product(a, b):
        return tf.reduce_sum(tf.matmul(a, b)[:1, :1])

    return (lambda: product(a, b).numpy()), 2.0 * n**3


def _numpy_preprocess(path: str, size: int) -> np.ndarray:
    """The preprocessing as extraction ran it before issue 24 (numpy resize), for "before" timings."""
    from msdn_tf.backbones import preprocessing as pre

    img = pre.load_image(path)
    h, w = img.shape[:2]
    new_h, new_w = pre.resized_size(h, w, size)
    img = pre.pil_resize(img, new_h, new_w)
    top, left = pre.center_crop_offsets(new_h, new_w, size)
    x = img[top : top + size, left : left + size].astype(np.float32) / np.float32(255.0)
    return (x - pre.IMAGENET_MEAN) / pre.IMAGENET_STD


def _end_to_end(backbone, paths, batch: int, size: int, numpy_preprocess: bool) -> None:
    from unittest import mock

    from msdn_tf.backbones import preprocessing as pre
    from msdn_tf.data import extraction

    patch = mock.patch.object(pre, "load_and_preprocess", _numpy_preprocess) if numpy_preprocess else None
    if patch:
        patch.start()
    try:
        for _ in extraction._torchvision_batches(backbone, paths, 0, batch, size):
            pass
    finally:
        if patch:
            patch.stop()


class TorchvisionWorker:
    """torchvision in another interpreter (:mod:`msdn_tf.perf.torchvision_worker`), driven over pipes.

    Args:
        python: the interpreter with ``torch`` and ``torchvision``.
        trunk: the Keras trunk (:func:`~msdn_tf.backbones.torchvision_resnet.build_torchvision_resnet`
            layout) whose weights torchvision loads.
        paths: the images of the end-to-end pipeline. x: the preprocessed batch (NHWC).
        size, batch: image size and images per network call.
        folder: where the weights, the image list and the batch are handed over.
        startup_s, call_s: time budgets of the start (import, build, first call) and of each command.
    """

    def __init__(self, python, trunk, paths, x, size, batch, folder, startup_s=600.0, call_s=900.0):
        from msdn_tf.backbones.torchvision_resnet import torchvision_state

        self.call_s, self.settle_s = float(call_s), 0.25
        np.savez(os.path.join(folder, "state.npz"), **torchvision_state(trunk))
        with open(os.path.join(folder, "images.txt"), "w", encoding="utf-8") as f:
            f.write("".join(p + "\n" for p in paths))
        np.save(os.path.join(folder, "x.npy"), np.asarray(x, np.float32))
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_worker.py")
        argv = [python, script, "--weights", os.path.join(folder, "state.npz")]
        argv += ["--images", os.path.join(folder, "images.txt"), "--image-size", str(size), "--batch", str(batch)]
        argv += ["--batch-input", os.path.join(folder, "x.npy"), "--out", folder]
        self.worker = PipeWorker(argv, f"--torch-python {python}", cwd=folder)
        line = self.worker.receive(float(startup_s), "starting")
        if not line.startswith("ready"):
            self._fail(line, "starting")
        self.info = json.loads(line[len("ready") :] or "{}")
        self.features = np.load(os.path.join(folder, "features.npy"))
        self.preprocessed = np.load(os.path.join(folder, "preprocessed.npy"))

    def _fail(self, line: str, what: str):
        """The worker's own ``{"error": ...}`` reply, or the line it gave instead of an answer."""
        try:
            message = json.loads(line)["error"]
        except (ValueError, KeyError, TypeError):
            message = f"answered {line[:200]!r} while {what}"
        self.worker.fail(message)

    def call(self, command: str) -> float:
        """Run ``net``, ``net_channels_last`` or ``end_to_end`` in the worker; the seconds it timed."""
        self.worker.send(command)
        line = self.worker.receive(self.call_s, f"running {command}")
        try:
            seconds = float(json.loads(line)["seconds"])
        except (ValueError, KeyError, TypeError):
            self._fail(line, f"running {command}")
        time.sleep(self.settle_s)  # torch's idle OpenMP threads spin a while: not into the next timing
        return seconds

    def close(self) -> None:
        """Stop the worker (``quit``, then kill after 60 s)."""
        self.worker.close()


def run_extraction_benchmark(args, command=None, log=None) -> dict:
    """Time preprocessing, the network variants, the conv rate and the end-to-end pipeline; the JSON report.

    Args:
        args: the parsed flags of ``python -m msdn_tf.bench_extract`` (``weights``,
            ``images``, ``image_size``, ``batch``, ``variants``, ``repeats``, ``warmup``,
            ``blocks``, ``width``).
        command: the command line to record. log: a function for progress lines.

    Returns:
        The report: ``machine``, ``config``, ``preprocess``, ``variants`` (images/s,
        GFLOP/s, fraction of the conv rate, feature error against ``before``),
        ``conv_rate``, ``end_to_end``, ``speedups``.
    """
    import keras

    from msdn_tf.backbones.preprocessing import load_and_preprocess
    from msdn_tf.backbones.torchvision_resnet import inference_trunk, load_backbone_file
    from msdn_tf.data.extraction import extraction_precision
    from msdn_tf.perf.model_speed import _backend_info, _cpu_bf16_flags

    log = log or (lambda line: None)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise MSDNError(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    size, batch = int(args.image_size), int(args.batch)
    torch_python = getattr(args, "torch_python", None)
    if torch_python:
        require_executable(torch_python, f"--torch-python {torch_python}")  # before minutes of work
    started, load_before = time.time(), _load()
    if args.weights:
        trunk, _ = load_backbone_file(args.weights, image_size=size)
    else:
        trunk = random_trunk(tuple(args.blocks), args.width, size)
    tmp = None
    if args.images:
        paths = list_images(args.images, 2 * batch)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="msdn-bench-extract-")
        paths = synthetic_images(tmp.name, 2 * batch)
    x = np.stack([load_and_preprocess(p, size) for p in paths[:batch]])
    policies = {}
    for v in args.variants:
        if v in ("auto", "mixed_bfloat16"):
            chosen = extraction_precision(v)
            policies[v] = (chosen.policy, chosen.reason)
        else:
            policies[v] = ("float32", "before: the trunk as loaded" if v == "before" else "requested")
    nets = {v: trunk if v == "before" else inference_trunk(trunk, policies[v][0]) for v in args.variants}
    flops = conv_flops_per_image(trunk)
    feats = {v: np.asarray(net.predict_on_batch(x)) for v, net in nets.items()}  # also compiles
    ref = feats.get("before", feats[args.variants[0]])
    errors = {v: float(np.linalg.norm(f - ref) / np.linalg.norm(ref)) for v, f in feats.items()}

    fns = {}
    fns["preprocess"] = lambda: [load_and_preprocess(p, size) for p in paths[:batch]]
    fns["preprocess_before"] = lambda: [_numpy_preprocess(p, size) for p in paths[:batch]]
    for v, net in nets.items():
        fns[f"net/{v}"] = (lambda n: lambda: n.predict_on_batch(x))(net)
    conv_shape = (batch, max(size // 16, 1), 256 * args.width // 64)
    conv_f32, conv_flops = _conv_fn(*conv_shape, "float32")
    fns["conv/float32"] = conv_f32
    if any(p[0] == "mixed_bfloat16" for p in policies.values()):
        fns["conv/bfloat16"] = _conv_fn(*conv_shape, "bfloat16")[0]
    fns["matmul/float32"], matmul_flops = _matmul_fn()
    ends = [v for v in ("before", "float32", "auto") if v in nets]
    for v in ends:
        fns[f"end_to_end/{v}"] = (lambda n, old: lambda: _end_to_end(n, paths, batch, size, old))(
            nets[v], v == "before"
        )
    worker = handover = None
    try:
        if torch_python:
            handover = tempfile.TemporaryDirectory(prefix="msdn-bench-torchvision-")
            log(f"starting the torchvision worker ({args.torch_python})")
            worker = TorchvisionWorker(args.torch_python, trunk, paths, x, size, batch, handover.name)
            for name in TORCHVISION_COMMANDS:
                fns[f"torchvision/{name}"] = (lambda c: lambda: worker.call(c))(name)
        for fn in fns.values():
            for _ in range(int(args.warmup)):
                fn()
        seconds = {name: [] for name in fns}
        for repeat in range(int(args.repeats)):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                timed = fn()  # the torchvision worker's commands return their own timing
                seconds[name].append(timed if isinstance(timed, float) else time.perf_counter() - t0)
            log(f"repeat {repeat + 1}/{args.repeats} done (load {_load()})")
    finally:
        if worker is not None:
            worker.close()
        if handover is not None:
            handover.cleanup()
        if tmp is not None:
            tmp.cleanup()

    def rate(name, images):
        return [images / s for s in seconds[name]]

    conv_rate = [conv_flops / s / 1e9 for s in seconds["conv/float32"]]
    variants = {}
    for v in nets:
        ips = rate(f"net/{v}", batch)
        gflops = [i * flops / 1e9 for i in ips]
        variants[v] = {
            "precision": {"used": policies[v][0], "reason": policies[v][1]},
            "images_per_s_median": statistics.median(ips),
            "images_per_s_best": max(ips),
            "gflop_per_s_median": statistics.median(gflops),
            "fraction_of_conv_rate_median": statistics.median(g / c for g, c in zip(gflops, conv_rate)),
            "fraction_of_conv_rate_all": [round(g / c, 3) for g, c in zip(gflops, conv_rate)],
            "feature_rel_l2_vs_before": errors[v],
            "feature_max_abs_vs_before": float(np.max(np.abs(feats[v] - ref))),
        }
    speedups = {}
    for a, b in (("float32", "before"), ("auto", "float32"), ("mixed_bfloat16", "float32"), ("auto", "before")):
        if a in nets and b in nets:
            speedups[f"net {a} / {b}"] = statistics.median(
                x / y for x, y in zip(seconds[f"net/{b}"], seconds[f"net/{a}"])
            )
    for a, b in (("float32", "before"), ("auto", "float32"), ("auto", "before")):
        if a in ends and b in ends:
            speedups[f"end_to_end {a} / {b}"] = statistics.median(
                x / y for x, y in zip(seconds[f"end_to_end/{b}"], seconds[f"end_to_end/{a}"])
            )
    torchvision = None
    if worker is not None:
        for a in ("float32", "auto", "mixed_bfloat16"):
            if a in nets:
                for b, label in (("net", "torchvision"), ("net_channels_last", "torchvision channels_last")):
                    speedups[f"net {a} / {label}"] = statistics.median(
                        x / y for x, y in zip(seconds[f"torchvision/{b}"], seconds[f"net/{a}"])
                    )
            if a in ends:
                speedups[f"end_to_end {a} / torchvision"] = statistics.median(
                    x / y for x, y in zip(seconds["torchvision/end_to_end"], seconds[f"end_to_end/{a}"])
                )
        theirs = worker.features
        torchvision = {
            "python": args.torch_python,
            **worker.info,
            "net": {"images_per_s_median": statistics.median(rate("torchvision/net", batch)), "layout": "NCHW"},
            "net_channels_last": {
                "images_per_s_median": statistics.median(rate("torchvision/net_channels_last", batch)),
                "layout": "channels_last",
            },
            "end_to_end": {
                "images": len(paths),
                "images_per_s_median": statistics.median(rate("torchvision/end_to_end", len(paths))),
                "what": "PIL decode + torchvision Resize/CenterCrop/ToTensor/Normalize (thread pool, one batch "
                "ahead) + the NCHW trunk",
            },
            "feature_rel_l2_ours_vs_torchvision": {
                v: float(np.linalg.norm(f - theirs) / np.linalg.norm(theirs)) for v, f in feats.items()
            },
            "preprocessed_vs_torchvision": {
                "max_abs": float(np.max(np.abs(worker.preprocessed - x))),
                "fraction_differing": float(np.mean(worker.preprocessed != x)),
            },
        }
    speedups["preprocess now / before"] = statistics.median(
        x / y for x, y in zip(seconds["preprocess_before"], seconds["preprocess"])
    )
    report = {
        "command": command,
        "config": {
            "image_size": size,
            "batch": batch,
            "weights": args.weights or f"random (seeded), blocks {list(args.blocks)}, width {args.width}",
            "images": args.images or "synthetic 500x375 JPEGs",
            "repeats": args.repeats,
            "warmup": args.warmup,
            "variants": list(args.variants),
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_before": load_before,
            "load_after": _load(),
            "cpu_bf16_flags": sorted(_cpu_bf16_flags()),
            "keras": keras.__version__,
            **_backend_info(),
        },
        "conv_gflop_per_image": flops / 1e9,
        "preprocess": {
            "images_per_s_median": statistics.median(rate("preprocess", batch)),
            "before_images_per_s_median": statistics.median(rate("preprocess_before", batch)),
            "note": "one thread: Pillow decode + Resize/CenterCrop/Normalize (before: numpy resize)",
        },
        "variants": variants,
        "conv_rate": {
            "shape": {"batch": conv_shape[0], "map": conv_shape[1], "channels": conv_shape[2], "kernel": 3},
            "float32_gflop_per_s_median": statistics.median(conv_rate),
            **(
                {
                    "bfloat16_gflop_per_s_median": statistics.median(
                        conv_flops / s / 1e9 for s in seconds["conv/bfloat16"]
                    )
                }
                if "conv/bfloat16" in seconds
                else {}
            ),
            "matmul_2048_float32_gflop_per_s_median": statistics.median(
                matmul_flops / s / 1e9 for s in seconds["matmul/float32"]
            ),
        },
        "end_to_end": {
            v: {
                "images": len(paths),
                "images_per_s_median": statistics.median(rate(f"end_to_end/{v}", len(paths))),
                "what": "decode + preprocess (thread pool, one batch ahead) + network, the extraction generator"
                + (" with the numpy resize and the unfolded trunk (before issue 24)" if v == "before" else ""),
            }
            for v in ends
        },
        **({"torchvision": torchvision} if torchvision is not None else {}),
        "speedups": speedups,
        "wall_s": round(time.time() - started, 1),
    }
    return report


def report_text(report: dict) -> str:
    """A short readable table of :func:`run_extraction_benchmark`'s report (what the command prints).

    One row per network variant (and torchvision's, when it ran): images/s of the network
    and end to end, the convolutions' GFLOP/s and fraction of the conv rate, the feature
    error; then the speed-ups (medians of per-repeat ratios).

    Example:
        >>> print(report_text(run_extraction_benchmark(args)))
    """
    machine, conv = report["machine"], report["conv_rate"]
    flops = report["conv_gflop_per_image"]
    lines = [
        f"conv rate: {conv['float32_gflop_per_s_median']:.1f} GFLOP/s float32 3x3"
        + (f", {conv['bfloat16_gflop_per_s_median']:.1f} bfloat16" if "bfloat16_gflop_per_s_median" in conv else "")
        + f", matmul {conv['matmul_2048_float32_gflop_per_s_median']:.1f}; {flops:.1f} GFLOP per image; "
        f"{machine['cpu_count']} CPUs {'+'.join(machine['cpu_bf16_flags']) or '(no bf16 flags)'}, "
        f"load {machine['load_before']} -> {machine['load_after']}",
        f"{'network':<28} {'net img/s':>9} {'GFLOP/s':>8} {'of conv':>7} {'end-to-end img/s':>16} {'rel L2 err':>10}",
    ]
    ends = report["end_to_end"]
    for name, v in report["variants"].items():
        label = f"{name} ({v['precision']['used']})"
        end = f"{ends[name]['images_per_s_median']:.2f}" if name in ends else "-"
        lines.append(
            f"{label:<28} {v['images_per_s_median']:>9.2f} {v['gflop_per_s_median']:>8.1f} "
            f"{v['fraction_of_conv_rate_median']:>7.2f} {end:>16} {v['feature_rel_l2_vs_before']:>10.1e}"
        )
    tv = report.get("torchvision")
    if tv:
        errors = tv["feature_rel_l2_ours_vs_torchvision"]
        for key, label in (("net", "torchvision (NCHW)"), ("net_channels_last", "torchvision (channels_last)")):
            ips = tv[key]["images_per_s_median"]
            end = f"{tv['end_to_end']['images_per_s_median']:.2f}" if key == "net" else "-"
            lines.append(f"{label:<28} {ips:>9.2f} {ips * flops:>8.1f} {'':>7} {end:>16} {'':>10}")
        lines.append(
            "features vs torchvision (same weights, same batch), rel L2: "
            + ", ".join(f"{k} {e:.1e}" for k, e in errors.items())
            + f"; preprocessed batch max abs diff {tv['preprocessed_vs_torchvision']['max_abs']:.1e}"
        )
    lines.append(
        f"preprocessing, one thread: {report['preprocess']['images_per_s_median']:.1f} img/s "
        f"(before: {report['preprocess']['before_images_per_s_median']:.1f})"
    )
    lines.append("speed-ups (medians of per-repeat ratios):")
    lines += [f"  {k:<46} {v:>6.2f}x" for k, v in report["speedups"].items()]
    lines.append(f"({report['wall_s']} s; --json for the full report: every repeat, the error in max abs too)")
    return "\n".join(lines)
