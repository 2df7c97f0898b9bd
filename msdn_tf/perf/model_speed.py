"""Benchmark MSDN training and evaluation against this machine's own matrix-multiply rate.

The library of the command ``python -m msdn_tf.bench``
(``python -m msdn_tf.bench [--regions 196 49] [--batch 50] [--steps N] [--jit/--no-jit]
[--precision float32|mixed_bfloat16|mixed_float16|auto] [--variants IMPL:JIT:PRECISION[:nocheck] ...] [--json OUT]``

At CUB shapes (K=312 attributes, C=200 classes of which 50 unseen, F=2048, D=300)
with synthetic inputs already in memory as tensors, it times

* one training step (the exact function ``fit`` runs: ``model.train_function``)
  at the training batch (50), and
* one evaluation step (``model.predict_function``, the predict path) at the
  evaluation batch (100),

and, in the same process, the backend's matmul (``tf.matmul``; ``jnp.matmul`` under
``jax.jit`` on JAX) at shapes of the model's own contractions
(``(B*R, F) x (F, 4K)`` forward, ``(F, B*R) x (B*R, 4K)`` weight gradient) and one
big square product. The essential work of the model is counted analytically
(:func:`essential_flops`, docs/reference.md §10), and the report gives the ratio of
the achieved essential FLOP/s to the representative matmul rate ("the limit").
It also gives the fraction with ALL the matrix work of a step counted
(:func:`all_matrix_flops_per_step`: the per-step ``V W`` projections, their
gradients and the class logits included). A variant with precision ``auto`` runs
the policy :mod:`msdn_tf.precision` chooses for this hardware and reports it, and a
variant with a float32 twin reports its speed-up over it (``vs_float32``).

Every timing is ``--repeats`` runs of ``--steps`` calls after ``--warmup`` calls;
the JSON reports the median and the minimum of the per-call time over the repeats,
and the machine load (``os.getloadavg``) before and after. Numbers taken on a busy
machine are low; compare runs by their load.

The backend is Keras': ``KERAS_BACKEND=jax python -m msdn_tf.bench`` runs the same
shapes on JAX (every step ``jax.jit``-compiled, as in training; TensorFlow is not
imported) and names the backend and its devices under ``machine``.
"""

from __future__ import annotations

import os
import statistics
import time

from msdn_tf.backend import current as _backend
from msdn_tf.errors import ConfigError
from msdn_tf.options import PRECISIONS

CUB = {"attributes": 312, "classes": 200, "unseen": 50, "features": 2048, "embed": 300}
IMPLS = ("fused", "einsum")
REFERENCE = {  # reference PyTorch code, 2-core x86 CPU, CUB, R=196, batch 50 (docs/reference.md §10)
    "train_images_per_s": 21.5,
    "train_step_s": 2.3,
    "eval_images_per_s": 32.0,
}


# --------------------------------------------------------------------------- FLOP count
def forward_flops_per_image(regions: int, features: int, attributes: int) -> int:
    """Essential forward FLOPs of one image: the four ``K x F x R`` contractions.

    ``S`` and the A->V attention logits (``V W_1``, ``V W_2`` against ``Fs``), ``T`` and
    the V->A attention logits (``W_1_1 V^T``, ``V W_2_1`` against ``Fs``): each is
    ``R * F * K`` multiply-adds, 2 FLOP each::

        forward = 4 * 2 * R * F * K

    Everything else per image (softmaxes, ``sum_r A * S``, ``att @ scores``) is
    O(R * K + C * K), three orders of magnitude less. The projections ``V W`` are
    per step, not per image (:func:`projection_flops_per_step`).
    """
    return 4 * 2 * regions * features * attributes


def train_flops_per_image(regions: int, features: int, attributes: int) -> int:
    """Essential training FLOPs of one image: the forward plus the weight gradients.

    The gradient of each contraction ``Y = Fs P^T`` with respect to the projected
    weights ``P`` (K x F) is ``dY^T Fs``, as many multiply-adds as the forward; the
    input features need no gradient. So::

        train = 2 * forward = 16 * R * F * K

    (CUB, R=196: 2.0 GFLOP, docs/reference.md §10.)
    """
    return 2 * forward_flops_per_image(regions, features, attributes)


def all_matrix_flops_per_step(
    batch: int, regions: int, features: int, attributes: int, embed: int, classes: int, training: bool
) -> int:
    """Every matrix product of one step, per-step work included (issue 16's accounting).

    The essential contractions of the batch (:func:`train_flops_per_image` or
    :func:`forward_flops_per_image` per image), the projections ``V W`` with, in
    training, their gradients (:func:`projection_flops_per_step`), and the class
    logits ``scores @ att^T`` of both sub-nets (``2 * 2 * B * K * C``; in training
    also their input gradient, ``att`` being constant)::

        train = B * 16 R F K + 3 * 8 K D F + 2 * 4 B K C
        eval  = B *  8 R F K +     8 K D F +     4 B K C
    """
    per_image = (train_flops_per_image if training else forward_flops_per_image)(regions, features, attributes)
    logits = 2 * 2 * batch * attributes * classes * (2 if training else 1)
    return batch * per_image + projection_flops_per_step(features, attributes, embed, training) + logits


def projection_flops_per_step(features: int, attributes: int, embed: int, training: bool) -> int:
    """FLOPs of the per-step projections ``V W`` (four ``K x D x F`` products; x3 with gradients).

    Not counted as essential: they do not grow with the batch.
    """
    forward = 4 * 2 * attributes * embed * features
    return 3 * forward if training else forward


# --------------------------------------------------------------------------- timing
def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def time_interleaved(fns: dict, steps: dict, repeats: int, warmup: int) -> dict:
    """Per-call seconds of every ``fns[name]()`` (each must block until its result exists).

    After ``warmup`` untimed calls of each, every repeat times ``steps[name]`` calls of
    each function in turn, so that the model steps and the matrix products of one
    repeat see the same machine load; ratios are taken per repeat.

    Returns:
        ``{name: [seconds per call in repeat 0, 1, ...]}``.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_call = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps[name]):
                fn()
            per_call[name].append((time.perf_counter() - start) / steps[name])
    return per_call


def matmul_fn(m: int, k: int, n: int, dtype="float32", transpose_a: bool = False):
    """A blocking call of the backend's matmul of an ``(m, k) x (k, n)`` product, and its FLOPs.

    ``tf.matmul`` in a ``tf.function`` on TensorFlow, ``jnp.matmul`` under ``jax.jit`` on JAX.
    """
    if _backend() == "jax":
        return _jax_matmul_fn(m, k, n, dtype, transpose_a)
    import tensorflow as tf

    a = tf.random.uniform((k, m) if transpose_a else (m, k), dtype=dtype)
    b = tf.random.uniform((k, n), dtype=dtype)

    @tf.function
    def product(a, b):
        return tf.reduce_sum(tf.matmul(a, b, transpose_a=transpose_a)[:1, :1])

    return (lambda: product(a, b).numpy()), 2.0 * m * k * n


def _jax_matmul_fn(m, k, n, dtype, transpose_a):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0))
    a = jax.random.uniform(keys[0], (k, m) if transpose_a else (m, k), dtype=dtype)
    b = jax.random.uniform(keys[1], (k, n), dtype=dtype)

    @jax.jit
    def product(a, b):
        return jnp.sum(jnp.matmul(a.T if transpose_a else a, b)[:1, :1])

    return (lambda: float(product(a, b))), 2.0 * m * k * n


# --------------------------------------------------------------------------- model
def _einsum_forward(model, features, return_features=False):
    """The forward pass as first written (before issue 7), kept to measure "before" numbers.

    Four separate ``einsum`` contractions of the (K, F) projections with the
    (B, R, F) features, output layout (B, K, R); no fusion. Same numbers as
    ``MSDN.call`` up to float rounding.
    """
    from keras import ops

    from msdn_tf.layers.common import as_regions, l2_normalize

    Fs = l2_normalize(as_regions(ops.convert_to_tensor(features)), axis=-1)
    V = model.embedding(None)
    S = ops.einsum("kf,brf->bkr", ops.matmul(V, model.a2v.W_1), Fs)
    A = ops.softmax(ops.einsum("kf,brf->bkr", ops.matmul(V, model.a2v.W_2), Fs), axis=-1)
    psi = ops.sum(A * S, axis=-1)
    T = ops.einsum("brf,fk->brk", Fs, ops.matmul(model.v2a.W_1_1, ops.transpose(V)))
    Bw = ops.softmax(ops.einsum("kf,brf->bkr", ops.matmul(V, model.v2a.W_2_1), Fs), axis=1)
    phi = ops.sum(Bw * ops.transpose(T, (0, 2, 1)), axis=-1)
    att = ops.convert_to_tensor(model.embedding.att)
    margin = model.margin()
    logits_a2v = ops.matmul(psi, ops.transpose(att)) + margin
    logits_v2a = ops.matmul(phi, ops.transpose(att)) + margin
    w1, w2 = model.fusion_weights
    return {
        "logits_a2v": logits_a2v,
        "logits_v2a": logits_v2a,
        "logits": w1 * logits_a2v + w2 * logits_v2a,
        "scores_a2v": psi,
        "scores_v2a": phi,
        "attention_a2v": A,
        "attention_v2a": Bw,
    }


def build_bench_model(
    regions: int,
    features: int,
    attributes: int,
    classes: int,
    unseen: int,
    embed: int,
    jit: bool,
    seed: int = 0,
    precision: str = "float32",
    **options,
):
    """An MSDN at the given shapes with random non-zero weights.

    Compiled as ``training.loop.build_model_from_config`` does.

    Under ``mixed_float16`` the optimizer is wrapped in a ``LossScaleOptimizer``.
    Build it under the Keras dtype policy ``precision``.
    """
    import keras
    import numpy as np

    from msdn_tf.model import build_msdn
    from msdn_tf.optimizers import TorchRMSprop

    rng = np.random.default_rng(seed)
    unseen_ids = sorted(rng.choice(classes, size=unseen, replace=False).tolist())
    seen_ids = [c for c in range(classes) if c not in unseen_ids]
    model = build_msdn(
        rng.random((classes, attributes)),
        rng.normal(size=(attributes, embed)),
        seen_ids,
        unseen_ids,
        feature_dim=features,
        num_regions=regions,
        seed=seed,
        **options,
    )
    for w in (model.a2v.W_2, model.v2a.W_1_1, model.v2a.W_2_1):  # zero at init: make the softmaxes non-trivial
        w.assign(rng.normal(scale=0.05, size=w.shape).astype("float32"))
    optimizer = TorchRMSprop()
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, jit_compile=jit)
    return model, seen_ids


def _use_einsum_forward(model):
    """Route ``model.call`` through :func:`_einsum_forward` (``--impl einsum``)."""
    model.call = lambda features, training=False, return_features=None: _einsum_forward(model, features)


def parse_variant(text: str) -> dict:
    """``"fused:jit:float32"`` -> ``{"impl": "fused", "jit": True, "precision": "float32"}`` (later parts optional).

    A fourth part ``nocheck`` turns off the training step's non-finite checks
    (``train.check_numerics``), to measure what they cost.
    """
    parts = text.split(":")
    impl = parts[0]
    jit = parts[1] if len(parts) > 1 else "jit"
    precision = parts[2] if len(parts) > 2 else "float32"
    check = parts[3] if len(parts) > 3 else "check"
    if (
        impl not in IMPLS
        or jit not in ("jit", "nojit")
        or precision not in PRECISIONS
        or check not in ("check", "nocheck")
        or len(parts) > 4
    ):
        raise ConfigError(
            f"variant {text!r}: expected IMPL[:jit|nojit[:PRECISION[:check|nocheck]]] with IMPL in "
            f"{IMPLS} and PRECISION in {PRECISIONS}"
        )
    name = f"{impl}:{jit}:{precision}" + (":nocheck" if check == "nocheck" else "")
    return {"name": name, "impl": impl, "jit": jit == "jit", "precision": precision, "check": check == "check"}


def resolve_variant_precision(variant: dict) -> dict:
    """Add ``policy`` (the dtype policy used) and ``precision_reason``; ``auto`` follows the hardware.

    Explicit policies are timed as asked, also where the hardware lacks them
    (that is what the bench is for); only ``auto`` is resolved (``msdn_tf.precision``).
    """
    from msdn_tf.precision import resolve_precision

    if variant["precision"] == "auto":
        chosen = resolve_precision("auto", setting="--variants")
        return {**variant, "policy": chosen.policy, "precision_reason": chosen.reason}
    return {**variant, "policy": variant["precision"], "precision_reason": "requested"}


def _variant_fns(variant, regions, args, x_train, y_train, x_eval):
    """Blocking ``train`` and ``eval`` calls of one model variant."""
    import keras

    K, C, U, F, D = args.attributes, args.classes, args.unseen, args.features, args.embed
    policy = variant.get("policy", variant["precision"])  # "auto" resolved by resolve_variant_precision
    keras.mixed_precision.set_global_policy(policy)  # layers take the policy at construction
    try:
        model, _ = build_bench_model(regions, F, K, C, U, D, jit=variant["jit"], precision=policy)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    if variant["impl"] == "einsum":
        _use_einsum_forward(model)
    model.check_numerics = variant.get("check", True)
    model.make_train_function()
    model.make_predict_function()
    batch = (x_train, y_train)
    if _backend() == "jax":
        return _jax_step_fns(model, batch, x_eval, getattr(args, "loop_steps", 1))
    return {
        "train": lambda: float(model.train_function([batch])["loss"]),
        "eval": lambda: model.predict_function([x_eval])["logits"].numpy(),
    }


def _jax_step_fns(model, batch, x_eval, loop_steps: int = 1):
    """Blocking ``train`` and ``eval`` calls on JAX, each ``loop_steps`` steps in ONE dispatch.

    ``train`` is the training loop's own multi-step function
    (:func:`msdn_tf.training.jax_loop.make_multi_step`): the batch of every step is
    gathered on the device from a held pool (here the bench batch, in a new order
    each step) and :func:`msdn_tf.training_jax.train_step` runs inside a
    ``lax.fori_loop``. ``eval`` is evaluation's own block function
    (:func:`msdn_tf.training_jax.predict_rows`): ``loop_steps`` evaluation batches
    (the bench batch in new row orders) in one dispatch. Each function carries
    ``steps_per_call``; the report is per step.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from msdn_tf import training_jax
    from msdn_tf.training.jax_loop import make_multi_step, model_state

    model.optimizer.build(model.trainable_variables)  # fit does this before its first step
    x, y = batch
    steps = max(1, int(loop_steps))
    rng = np.random.default_rng(2)
    order = np.stack([rng.permutation(x.shape[0]) for _ in range(steps)]).astype(np.int32)
    positions, labels = jnp.asarray(order), jnp.asarray(np.asarray(y)[order])
    run, _ = make_multi_step(model, steps)

    def copies(values):  # the function donates (frees) the state it is given
        return jax.tree.map(lambda v: jnp.array(v, copy=True), values)

    state = {"train": copies(model_state(model))}

    def train():
        state["train"], logs = run(state["train"], x, positions, labels, steps)
        return float(jax.block_until_ready(logs)[-1, 0])

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    # Evaluation's own function (training_jax.predict_rows): a block of `steps` batches, one
    # dispatch, lax.map over the batches. Each batch is the eval batch in another row order,
    # so no batch's work can be shared with another's.
    eval_order = np.concatenate([rng.permutation(x_eval.shape[0]) for _ in range(steps)])
    block = jnp.take(x_eval, jnp.asarray(eval_order), axis=0)
    predict = training_jax.predict_function(model, int(x_eval.shape[0]), steps)

    def evaluate():
        return jax.block_until_ready(predict(trainable, non_trainable, block)["logits"])

    train.steps_per_call = evaluate.steps_per_call = steps
    return {"train": train, "eval": evaluate}


def bench_inputs(regions: int, args) -> tuple:
    """``(x_train, y_train, x_eval)``: random features and seen labels as backend tensors (seed 1)."""
    import numpy as np
    from keras import ops

    rng = np.random.default_rng(1)
    B, E, F = args.batch, args.eval_batch, args.features
    # Backend tensors (on the accelerator, if any), so that no step copies its input from the host.
    x_train = ops.convert_to_tensor(rng.random((B, regions, F), dtype=np.float32))
    y_train = ops.convert_to_tensor(
        np.asarray(_seen_classes(args))[rng.integers(0, args.classes - args.unseen, size=B)]
    )
    x_eval = ops.convert_to_tensor(rng.random((E, regions, F), dtype=np.float32))
    return x_train, y_train, x_eval


def model_matmuls(regions: int, args) -> dict:
    """The model's own product shapes: forward and weight gradient (train), forward (eval)."""
    B, E, F, K = args.batch, args.eval_batch, args.features, args.attributes
    return {
        "forward": dict(m=B * regions, k=F, n=4 * K),
        "weight_gradient": dict(m=F, k=B * regions, n=4 * K, transpose_a=True),
        "forward_eval": dict(m=E * regions, k=F, n=4 * K),
    }


def step_summary(t: list, images: int, essential: float, all_matrix: float, limits: list, projection: float) -> dict:
    """The report of one step kind (train or eval) from its per-repeat seconds ``t``.

    Args:
        t: seconds per call, one per repeat; ``images``: the batch; ``essential``: essential
            FLOPs per image; ``all_matrix``: all matrix FLOPs per step; ``limits``: the matmul
            limit (GFLOP/s) of each repeat; ``projection``: FLOPs of the ``V W`` projections per step.
    """
    achieved = [images * essential / s / 1e9 for s in t]  # essential GFLOP/s per repeat
    fractions = [a / lim for a, lim in zip(achieved, limits)]
    achieved_all = [all_matrix / s / 1e9 for s in t]  # every matrix product of the step
    fractions_all = [a / lim for a, lim in zip(achieved_all, limits)]
    return {
        "batch": images,
        "step_s_median": statistics.median(t),
        "step_s_min": min(t),
        "step_s_all": [round(x, 4) for x in t],
        "images_per_s_median": images / statistics.median(t),
        "images_per_s_best": images / min(t),
        "essential_gflop_per_image": essential / 1e9,
        "essential_gflop_per_s_median": statistics.median(achieved),
        "limit_gflop_per_s_median": statistics.median(limits),
        "limit_gflop_per_s_all": [round(x, 1) for x in limits],
        "fraction_of_limit_median": statistics.median(fractions),
        "fraction_of_limit_best": max(fractions),
        "fraction_of_limit_all": [round(x, 3) for x in fractions],
        # Load only ever slows a measurement down: the fastest step against the
        # fastest matmul of the run is the most load-robust ratio.
        "fraction_best_vs_best_limit": max(achieved) / max(limits),
        "projection_gflop_per_step": projection / 1e9,
        "all_matrix_gflop_per_step": all_matrix / 1e9,
        "fraction_all_matrix_median": statistics.median(fractions_all),
        "fraction_all_matrix_all": [round(x, 3) for x in fractions_all],
        "fraction_all_matrix_best_vs_best_limit": max(achieved_all) / max(limits),
    }


def variant_entry(v: dict, variants, seconds: dict, summaries: dict, regions: int, args) -> dict:
    """One variant's report: its train/eval summaries, precision, and ratios to the reference and to float32."""
    entry = dict(summaries)
    if regions == 196 and (args.attributes, args.classes, args.unseen, args.features, args.batch) == (
        312,
        200,
        50,
        2048,
        50,
    ):
        entry["vs_reference"] = {
            "train": entry["train"]["images_per_s_median"] / REFERENCE["train_images_per_s"],
            "eval": entry["eval"]["images_per_s_median"] / REFERENCE["eval_images_per_s"],
        }
    entry["precision"] = {"requested": v["precision"], "used": v["policy"], "reason": v["precision_reason"]}
    base = f"{v['impl']}:{'jit' if v['jit'] else 'nojit'}:float32"
    if v["name"] != base and base in [w["name"] for w in variants]:
        # Per repeat (the same load for both), then the median: speed-up over float32.
        entry["vs_float32"] = {
            mode: statistics.median(b / x for b, x in zip(seconds[f"{base}/{mode}"], seconds[f"{v['name']}/{mode}"]))
            for mode in ("train", "eval")
        }
    return entry


def bench_shape(regions: int, args, variants) -> dict:
    """Time every variant's train and eval step and the matmul limits, interleaved per repeat."""
    K, F, B, E = args.attributes, args.features, args.batch, args.eval_batch
    x_train, y_train, x_eval = bench_inputs(regions, args)
    fns, steps, flops = {}, {}, {}
    for v in variants:
        for mode, fn in _variant_fns(v, regions, args, x_train, y_train, x_eval).items():
            fns[f"{v['name']}/{mode}"] = fn
            steps[f"{v['name']}/{mode}"] = args.steps
    matmuls = model_matmuls(regions, args)
    for name, shape in matmuls.items():
        fns[name], flops[name] = matmul_fn(**shape)
        steps[name] = args.matmul_steps
    seconds = time_interleaved(fns, steps, args.repeats, args.warmup)
    for name, fn in fns.items():  # a call of several steps in one dispatch (JAX): report per step
        seconds[name] = [t / getattr(fn, "steps_per_call", 1) for t in seconds[name]]

    gflops = {name: [flops[name] / t / 1e9 for t in seconds[name]] for name in matmuls}
    # Training does as many FLOPs in forward-shaped as in gradient-shaped products:
    # its limit is the harmonic mean of the two rates, per repeat.
    limits = {
        "train": [2.0 / (1.0 / f + 1.0 / g) for f, g in zip(gflops["forward"], gflops["weight_gradient"])],
        "eval": gflops["forward_eval"],
    }
    essential = {"train": train_flops_per_image(regions, F, K), "eval": forward_flops_per_image(regions, F, K)}
    images = {"train": B, "eval": E}
    result = {"regions": regions, "variants": {}}
    for v in variants:
        summaries = {
            mode: step_summary(
                seconds[f"{v['name']}/{mode}"],
                images[mode],
                essential[mode],
                all_matrix_flops_per_step(images[mode], regions, F, K, args.embed, args.classes, mode == "train"),
                limits[mode],
                projection_flops_per_step(F, K, args.embed, mode == "train"),
            )
            for mode in ("train", "eval")
        }
        result["variants"][v["name"]] = variant_entry(v, variants, seconds, summaries, regions, args)
    result["matmul"] = {
        name: {
            "shape": [v["m"], v["k"], v["n"]],
            "transpose_a": v.get("transpose_a", False),
            "gflop_per_s_median": statistics.median(gflops[name]),
            "gflop_per_s_max": max(gflops[name]),
        }
        for name, v in matmuls.items()
    }
    result["limit_note"] = (
        f"fraction = achieved essential FLOP/s / float32 {_MATMUL_NAME[_backend()]} FLOP/s "
        "measured in the same "
        "repeat; train limit: harmonic mean of the forward- and gradient-shaped rates; "
        "eval limit: the forward-shaped rate at the eval batch"
    )
    return result


def _cpu_bf16_flags() -> set:
    from msdn_tf.precision import BF16_CPU_FLAGS, FP16_CPU_FLAGS, cpu_flags

    return cpu_flags() & set(BF16_CPU_FLAGS + FP16_CPU_FLAGS)


def _backend_info() -> dict:
    """The backend, its version and devices (imports only the backend in use)."""
    import keras

    if _backend() == "jax":
        import jax

        return {
            "backend": "jax",
            "jax": jax.__version__,
            "keras": keras.__version__,
            "devices": [str(d) for d in jax.devices()],
        }
    import tensorflow as tf

    return {
        "backend": "tensorflow",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
    }


_MATMUL_NAME = {"tensorflow": "tf.matmul", "jax": "jax.numpy.matmul (jax.jit)"}


def _seen_classes(args):
    """The seen class ids of :func:`build_bench_model` (seed 0)."""
    import numpy as np

    rng = np.random.default_rng(0)
    unseen = set(rng.choice(args.classes, size=args.unseen, replace=False).tolist())
    return np.array([c for c in range(args.classes) if c not in unseen], dtype=np.int64)


def run_benchmark(args, command: str | None = None) -> dict:
    """Time every variant at every ``args.regions`` and return the JSON report.

    Args:
        args: the parsed flags of ``python -m msdn_tf.bench`` (``argparse.Namespace``:
            ``regions``, ``batch``, ``eval_batch``, ``steps``, ``repeats``, ``warmup``,
            ``matmul_steps``, ``jit``, ``impl``, ``precision``, ``variants``, the shape flags).
        command: the command line to record in the report (None when called from Python).

    Returns:
        The report (``config``, ``machine``, ``matmul_square``, ``shapes``, ...).

    Example:
        >>> from msdn_tf.cli.bench import build_parser
        >>> report = run_benchmark(build_parser().parse_args(["--regions", "49", "--steps", "1"]))

    Reference: docs/reference.md §10 (the FLOP count) and docs/performance.md.
    """
    from msdn_tf.config import TrainConfig

    backend = _backend()
    if args.jit is None:  # training's default: train.jit_compile on TensorFlow; JAX always jits
        args.jit = TrainConfig().jit_compile or backend == "jax"
    names = args.variants or [f"{args.impl}:{'jit' if args.jit else 'nojit'}:{args.precision}"]
    variants = [resolve_variant_precision(parse_variant(v)) for v in names]
    if backend == "jax" and not all(v["jit"] for v in variants):
        raise ConfigError(
            "on the JAX backend every step is jax.jit-compiled, as in training; 'nojit' (a TensorFlow "
            "graph without XLA) has no JAX counterpart: use jit variants (or --jit)"
        )
    load_before = _load()
    started = time.time()
    shapes = [bench_shape(r, args, variants) for r in args.regions]
    square_fn, square_flops = matmul_fn(2048, 2048, 2048)
    square_s = time_interleaved({"square": square_fn}, {"square": args.matmul_steps}, args.repeats, 1)["square"]
    square = {
        "shape": [2048, 2048, 2048],
        "gflop_per_s_median": square_flops / statistics.median(square_s) / 1e9,
        "gflop_per_s_max": square_flops / min(square_s) / 1e9,
    }
    report = {
        "command": command,
        "config": {
            "variants": [v["name"] for v in variants],
            "precision_used": {v["name"]: v["policy"] for v in variants},
            "batch": args.batch,
            "eval_batch": args.eval_batch,
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "attributes": args.attributes,
            "classes": args.classes,
            "unseen": args.unseen,
            "features": args.features,
            "embed": args.embed,
            "steps_per_dispatch": getattr(args, "loop_steps", 1) if backend == "jax" else 1,
        },
        "machine": {"cpu_count": os.cpu_count(), "load_before": load_before, "load_after": _load(), **_backend_info()},
        "flop_formula": {
            "forward_per_image": "4 * 2 * R * F * K",
            "train_per_image": "2 * forward = 16 * R * F * K",
            "all_matrix_train_per_step": "B * 16 R F K + 3 * 8 K D F + 2 * 4 B K C",
            "all_matrix_eval_per_step": "B * 8 R F K + 8 K D F + 4 B K C",
        },
        "cpu_bf16_flags": sorted(_cpu_bf16_flags()),
        "matmul_square": square,
        "shapes": shapes,
        "reference": REFERENCE,
        "wall_s": round(time.time() - started, 1),
    }
    return report


def report_text(report: dict) -> str:
    """A short readable table of :func:`run_benchmark`'s report (what ``msdn_tf.bench`` prints without --json).

    One row per regions x variant: training and evaluation images/s (median) and their
    fraction of this machine's measured matrix-multiply rate.

    Example:
        >>> print(report_text(run_benchmark(args)))
    """
    square = report["matmul_square"]
    machine = report["machine"]
    lines = [
        f"matmul limit: {square['gflop_per_s_median']:.1f} GFLOP/s (2048^3, median); "
        f"{machine['cpu_count']} CPUs, load {machine['load_before']} -> {machine['load_after']}",
        f"{'R':>4}  {'variant':<28} {'train img/s':>11} {'of limit':>8} {'eval img/s':>11} {'of limit':>8}",
    ]
    for shape in report["shapes"]:
        for name, entry in shape["variants"].items():
            train, evaluate = entry["train"], entry["eval"]
            lines.append(
                f"{shape['regions']:>4}  {name:<28} {train['images_per_s_median']:>11.1f} "
                f"{train['fraction_of_limit_median']:>8.1%} {evaluate['images_per_s_median']:>11.1f} "
                f"{evaluate['fraction_of_limit_median']:>8.1%}"
            )
    lines.append(f"({report['wall_s']} s; --json for the full report: every repeat, FLOP counts, ratios)")
    return "\n".join(lines)
