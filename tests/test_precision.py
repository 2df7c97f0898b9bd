"""train.precision: resolution against the hardware, clear errors, and a mixed run end to end
(train, resume, evaluate, visualize, export with float32 signatures)."""

import json

import numpy as np
import pytest

from msdn_tf.cli import train
from msdn_tf.config import resolve_config
from msdn_tf.errors import ConfigError
from msdn_tf.precision import EMULATED_FLOAT16_ENV, cpu_flags, resolve_precision
from msdn_tf.training.loop import build_model_from_config, run_training
from tests.helpers import Interrupt, write_tiny_yaml


# ------------------------------------------------------------------------------ resolution
@pytest.mark.parametrize(
    "flags, gpus, policy, why",
    [
        ({"avx512f", "avx512_bf16"}, [], "mixed_bfloat16", "avx512_bf16"),
        ({"amx_bf16", "amx_tile"}, [], "mixed_bfloat16", "amx_bf16"),
        ({"avx512f", "avx2"}, [], "float32", "no native bfloat16"),
        ({"avx512_bf16"}, [(8, 0)], "mixed_bfloat16", "compute capability 8.0"),
        (set(), [(7, 5)], "float32", "no native bfloat16"),  # a GPU decides, not the host CPU's flags
    ],
)
def test_auto_follows_the_hardware(flags, gpus, policy, why):
    p = resolve_precision("auto", flags=flags, gpus=gpus, environ={}, backend="tensorflow")
    assert p.policy == policy and why in p.reason and p.requested == "auto"
    assert p.to_dict() == {"requested": "auto", "used": policy, "reason": p.reason}


def test_auto_on_jax_uses_bfloat16_on_gpus_only():
    # XLA:CPU does not use the CPU's bfloat16 instructions: auto stays float32 there, and says why.
    cpu = resolve_precision("auto", flags={"avx512_bf16", "amx_bf16"}, gpus=[], environ={}, backend="jax")
    assert cpu.policy == "float32" and "XLA:CPU" in cpu.reason
    gpu = resolve_precision("auto", flags=set(), gpus=[(9, 0)], environ={}, backend="jax")
    assert gpu.policy == "mixed_bfloat16" and "compute capability 9.0" in gpu.reason
    tf_cpu = resolve_precision("auto", flags={"avx512_bf16"}, gpus=[], environ={}, backend="tensorflow")
    assert tf_cpu.policy == "mixed_bfloat16"


def test_explicit_values_and_float16_hardware():
    assert resolve_precision("float32", flags=set(), gpus=[]).policy == "float32"
    slow = resolve_precision("mixed_bfloat16", flags=set(), gpus=[], environ={})
    assert slow.policy == "mixed_bfloat16" and "emulated" in slow.reason
    assert resolve_precision("mixed_float16", flags=set(), gpus=[(7, 0)], environ={}).loss_scaling
    assert resolve_precision("mixed_float16", flags={"avx512_fp16"}, gpus=[], environ={}).policy == "mixed_float16"
    with pytest.raises(ConfigError, match=r"'train.precision' is mixed_float16 but this machine has no float16"):
        resolve_precision("mixed_float16", flags={"avx512_bf16"}, gpus=[], environ={})
    forced = resolve_precision("mixed_float16", flags=set(), gpus=[], environ={EMULATED_FLOAT16_ENV: "1"})
    assert forced.policy == "mixed_float16" and "emulated" in forced.reason
    with pytest.raises(ConfigError, match=r"'--precision' must be one of .*got 'half'"):
        resolve_precision("half", setting="--precision")


def test_cpu_flags_reads_proc_cpuinfo_format(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(path)) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_bad_precision_values_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--precision", "half"])
    assert exc.value.code == 2 and "--precision" in capsys.readouterr().err
    with pytest.raises(
        ConfigError,
        match=r"'train.precision' must be one of float32, mixed_bfloat16, "
        r"mixed_float16, auto; got 'fp8'",
    ):
        resolve_config("demo", overrides=["train.precision=fp8"])
    if not cpu_flags() & {"avx512_fp16", "amx_fp16"}:
        import os

        if os.environ.get(EMULATED_FLOAT16_ENV) != "1":
            assert train.main(["--precision", "mixed_float16", "--run-dir", str(tmp_path / "r")]) == 2
            assert "'train.precision' is mixed_float16 but this machine has no float16" in capsys.readouterr().err
            assert not (tmp_path / "r").exists()  # nothing written


# ------------------------------------------------------------------------------ a mixed run end to end
@pytest.fixture
def tiny_config(tmp_path):
    return write_tiny_yaml(tmp_path, iterations=8, eval_every=4)


@pytest.mark.slow
def test_mixed_bfloat16_run_resume_evaluate_visualize_export(tiny_config, tmp_path, capsys):
    import keras
    import tensorflow as tf

    overrides = [f"data.data_dir={tmp_path / 'data'}", "train.precision=mixed_bfloat16"]
    config = resolve_config("demo", [tiny_config], overrides)
    full = run_training(config, run_dir=tmp_path / "full", log=lambda *a: None)
    assert full["precision"]["used"] == "mixed_bfloat16"
    assert json.loads((tmp_path / "full" / "results.json").read_text())["precision"]["used"] == "mixed_bfloat16"
    assert "precision: mixed_bfloat16" in (tmp_path / "full" / "config.yaml").read_text()
    for entry in full["history"]:
        assert all(np.isfinite(v) for v in (entry["acc"], entry["H"]))

    # The model keeps its policy; variables and optimizer state are float32.
    model = keras.models.load_model(tmp_path / "full" / "model.keras", compile=False)
    assert model.dtype_policy.name == "mixed_bfloat16" and model.a2v.dtype_policy.name == "mixed_bfloat16"
    assert {w.dtype for w in model.weights} == {"float32"}
    opt = np.load(
        tmp_path
        / "full"
        / "checkpoint"
        / sorted(p.name for p in (tmp_path / "full" / "checkpoint").glob("*.optimizer.npz"))[0]
    )
    assert {opt[k].dtype for k in opt.files} <= {np.dtype("float32"), np.dtype("int64")}

    # Interrupted and resumed: the same result as the uninterrupted mixed run.
    def stop_at_8(step, **kwargs):
        if step == 8:
            raise Interrupt()

    with pytest.raises(Interrupt):
        run_training(config, run_dir=tmp_path / "cut", log=lambda *a: None, eval_hooks=[stop_at_8])
    assert train.main(["--run-dir", str(tmp_path / "cut"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert resumed["final"]["losses"] == full["final"]["losses"] and resumed["precision"]["used"] == "mixed_bfloat16"

    from msdn_tf.cli import evaluate, export, visualize

    assert evaluate.main(["--run", str(tmp_path / "full")]) == 0
    out = capsys.readouterr().out
    assert "CZSL" in out or "acc" in out
    png = tmp_path / "att.png"
    assert visualize.main(["attention", "--run", str(tmp_path / "full"), "--index", "0", "--out", str(png)]) == 0
    assert png.is_file()
    served = tmp_path / "models" / "m"
    assert (
        export.main(
            ["--run", str(tmp_path / "full"), "--out", str(served), "--verify-samples", "2", "--image-size", "64"]
        )
        == 0
    ), capsys.readouterr().err
    loaded = tf.saved_model.load(str(served / "1"))
    sig = loaded.signatures["serving_default"]
    assert [s.dtype for s in sig.structured_input_signature[1].values()] == [tf.float32]
    assert sig.structured_outputs["scores"].dtype == tf.float32
    assert sig.structured_outputs["top_k_scores"].dtype == tf.float32


def test_mixed_float16_trains_with_loss_scaling_and_resumes(tiny_config, tmp_path, monkeypatch):
    import keras

    monkeypatch.setenv(EMULATED_FLOAT16_ENV, "1")
    config = resolve_config(
        "demo", [tiny_config], [f"data.data_dir={tmp_path / 'data'}", "train.precision=mixed_float16"]
    )
    full = run_training(config, run_dir=tmp_path / "full", log=lambda *a: None)
    assert full["precision"]["used"] == "mixed_float16"
    assert np.isfinite(full["final"]["losses"]["loss"])

    def stop_at_8(step, **kwargs):
        if step == 8:
            raise Interrupt()

    with pytest.raises(Interrupt):
        run_training(config, run_dir=tmp_path / "cut", log=lambda *a: None, eval_hooks=[stop_at_8])
    resumed = run_training(config, run_dir=tmp_path / "cut", resume=True, log=lambda *a: None)
    assert resumed["final"]["losses"] == full["final"]["losses"]
    model = keras.models.load_model(tmp_path / "full" / "model.keras", compile=False)
    assert model.dtype_policy.name == "mixed_float16"
    # build_model_from_config wraps the optimizer: the loss scale is part of the checkpoint.
    from msdn_tf.data.registry import load_dataset

    built = build_model_from_config(config, load_dataset(config))
    assert isinstance(built.optimizer, keras.optimizers.LossScaleOptimizer)


def test_auto_is_resolved_in_the_saved_config(tiny_config, tmp_path):
    config = resolve_config(
        "demo",
        [tiny_config],
        [f"data.data_dir={tmp_path / 'data'}", "train.precision=auto", "train.iterations=2", "train.eval_every=2"],
    )
    result = run_training(config, run_dir=tmp_path / "run", log=lambda *a: None)
    expected = resolve_precision("auto").policy
    assert result["precision"]["requested"] == "auto" and result["precision"]["used"] == expected
    assert f"precision: {expected}" in (tmp_path / "run" / "config.yaml").read_text()
    assert config.train.precision == "auto"  # the caller's config is not changed
