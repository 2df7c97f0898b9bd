"""Training under MirroredStrategy on 2 logical CPU devices equals single-device training.

The logical devices must be configured before TensorFlow initialises, so the
checks run in ONE subprocess (this file run as a script) that prints a JSON
report; the test asserts on it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def test_strategy_names_and_config():
    from msdn_tf.cli.train import build_parser, config_from_args
    from msdn_tf.config import resolve_config
    from msdn_tf.distribute import get_strategy
    from msdn_tf.options import STRATEGIES

    assert STRATEGIES == ("none", "mirrored", "multi_worker")
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy("typo")
    assert resolve_config("demo").train.strategy == "none"
    args = build_parser().parse_args(["--strategy", "mirrored"])
    assert config_from_args(args).train.strategy == "mirrored"


@pytest.mark.slow
def test_mirrored_training_equals_single_device(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    # Keras fit splits each global batch over the replicas (8 -> 4 + 4), not duplicates it.
    assert report["split_shapes"] == [[4, 4]] * 2
    for case in report["sgd"]:  # one SGD(lr=1) step: the weight change IS minus the gradient
        assert case["max_rel_diff"] < 1e-5, case
        assert case["loss_rel_diff"] < 1e-5, case
    assert report["rmsprop"]["finite"]
    assert report["rmsprop"]["fraction_close"] > 0.999, report["rmsprop"]
    run = report["run_training"]
    assert run["loss_rel_diff"] < 1e-4, run
    assert abs(run["H_single"] - run["H_mirrored"]) < 1e-3, run


# --------------------------------------------------------------------------- the subprocess
def _worker(tmp):  # pragma: no cover - runs in the subprocess
    from msdn_tf.distribute import get_strategy, split_cpu_devices

    split_cpu_devices(2)  # before any TensorFlow op
    import keras
    import tensorflow as tf

    from msdn_tf.model import build_msdn
    from msdn_tf.optimizers import TorchRMSprop

    mirrored = get_strategy("mirrored")
    report = {"replicas": mirrored.num_replicas_in_sync}

    def numpy_batches(x, y):  # the shape of msdn_tf.data.pipeline.train_dataset: one element per batch
        def fetch(i):
            return x[int(i)], y[int(i)]

        def load(i):
            a, b = tf.numpy_function(fetch, [i], [tf.float32, tf.int64])
            return tf.ensure_shape(a, [None] + list(x.shape[2:])), tf.ensure_shape(b, [None])

        return tf.data.Dataset.range(len(x)).map(load)

    rng = np.random.default_rng(7)
    K, D, F, R, C, unseen = 5, 4, 12, 6, 9, [2, 7]
    seen = [c for c in range(C) if c not in unseen]
    att, w2v = rng.random((C, K)), rng.normal(size=(K, D))
    weights = None

    def make(strategy, optimizer):
        nonlocal weights
        with strategy.scope():
            model = build_msdn(att, w2v, seen, unseen, feature_dim=F, seed=1, lambda_cal=0.3, distill_weight=0.05)
            if weights is None:
                for w in model.trainable_weights:
                    w.assign(rng.normal(scale=0.5, size=w.shape).astype("float32"))
                weights = model.get_weights()
            model.set_weights(weights)
            model.compile(optimizer=optimizer(), jit_compile=False)
        return model

    x8 = rng.random((2, 8, R, F)).astype("float32")
    y8 = rng.choice(seen, size=(2, 8)).astype("int64")
    dist = mirrored.experimental_distribute_dataset(numpy_batches(x8, y8))
    report["split_shapes"] = [[int(t.shape[0]) for t in mirrored.experimental_local_results(b[0])] for b in dist]

    report["sgd"] = []
    # Uneven splits (a global batch of 7 -> 4 + 3) fail inside Keras' distributed fit
    # (AddN of the two replicas' differently shaped inputs), so run_training asks for
    # a batch divisible by the replicas; local_batch_weight would weight them right.
    for B in (8, 6):
        x = rng.random((1, B, R, F)).astype("float32")
        y = rng.choice(seen, size=(1, B)).astype("int64")
        deltas, losses = [], []
        for strategy in (tf.distribute.get_strategy(), mirrored):
            model = make(strategy, lambda: keras.optimizers.SGD(learning_rate=1.0))
            before = [np.asarray(w) for w in model.trainable_weights]
            hist = model.fit(numpy_batches(x, y), epochs=1, verbose=0)
            deltas.append([np.asarray(w) - b for w, b in zip(model.trainable_weights, before)])
            losses.append(hist.history["loss"][-1])
        rel = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30)) for a, b in zip(*deltas))
        report["sgd"].append(
            {"batch": B, "max_rel_diff": rel, "loss_rel_diff": abs(losses[0] - losses[1]) / abs(losses[0])}
        )

    x = rng.random((3, 8, R, F)).astype("float32")
    y = rng.choice(seen, size=(3, 8)).astype("int64")
    finals = []
    for strategy in (tf.distribute.get_strategy(), mirrored):
        model = make(strategy, lambda: TorchRMSprop(learning_rate=1e-3))
        model.fit(numpy_batches(x, y), epochs=1, verbose=0)
        finals.append(np.concatenate([np.asarray(w).ravel() for w in model.trainable_weights]))
    report["rmsprop"] = {
        "finite": bool(np.all(np.isfinite(finals[1]))),
        "fraction_close": float(np.mean(np.isclose(finals[0], finals[1], rtol=1e-4, atol=1e-6))),
    }

    from msdn_tf.config import resolve_config
    from msdn_tf.training.loop import run_training

    results = {}
    for name in ("none", "mirrored"):
        config = resolve_config(
            "demo",
            overrides=[
                "train.iterations=3",
                "train.eval_every=3",
                "train.verbose=0",
                f"train.strategy={name}",
                "data.batch_size=16",
            ],
        )
        results[name] = run_training(config, run_dir=Path(tmp) / name, log=lambda *a: None)
    single, multi = results["none"]["final"], results["mirrored"]["final"]
    report["run_training"] = {
        "loss_rel_diff": abs(single["losses"]["loss"] - multi["losses"]["loss"]) / abs(single["losses"]["loss"]),
        "H_single": single["H"],
        "H_mirrored": multi["H"],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[1])
