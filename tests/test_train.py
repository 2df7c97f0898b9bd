"""End-to-end training on a tiny demo: CLI, results, TensorBoard, checkpoints, resume, determinism, errors."""

import json

import numpy as np
import pytest

from msdn_tf.cli import train
from msdn_tf.config import resolve_config
from msdn_tf.training.loop import evaluation_steps, run_training, schedule
from tests.helpers import Interrupt, write_tiny_yaml


@pytest.fixture
def tiny_config(tmp_path):
    return write_tiny_yaml(tmp_path)


def args(tiny_config, tmp_path, *extra):
    return ["--dataset", "demo", "--config", str(tiny_config), "--data-dir", str(tmp_path / "data"), *extra]


def test_tiny_demo_trains_end_to_end(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(args(tiny_config, tmp_path, "--run-dir", str(run))) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    results = json.loads((run / "results.json").read_text())
    assert summary["final"]["acc"] == pytest.approx(results["final"]["acc"], abs=1e-4)
    assert results["final"]["step"] == 60 and [h["step"] for h in results["history"]] == [0, 30, 60]
    # Better than where it started, and better than chance (1/3) on unseen classes.
    assert results["final"]["acc"] > results["initial"]["acc"]
    assert results["final"]["acc"] > 1 / 3
    assert "selected on the TEST split" in results["best_on_test"]["note"]
    assert "best H during training*" in (run / "results.md").read_text()
    for term in ("ce_a2v", "cal_a2v", "ce_v2a", "cal_v2a", "distill", "loss"):
        assert term in results["final"]["losses"]
    saved = resolve_config("demo", [run / "config.yaml"])
    assert saved.train.iterations == 60 and saved.demo.num_classes == 10
    assert (run / "model.keras").is_file()
    # TensorBoard: loss terms and evaluation scalars.
    tags = _tensorboard_tags(run)
    assert {"train/ce_a2v", "train/distill", "eval/H", "eval/acc", "eval/U", "eval/S"} <= tags
    _check_tensorboard_run(run, results)


def _events(folder):
    import tensorflow as tf

    for path in sorted(folder.glob("events.out.tfevents.*")):
        yield from tf.compat.v1.train.summary_iterator(str(path))


def _check_tensorboard_run(run, results):
    """Step-0 evaluation, hparams session named after the run folder, final figures, descriptions."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import metadata as hp_metadata

    scalars, descriptions, session = {}, {}, None
    for event in _events(run):  # the events are in the run folder: TensorBoard's run name is its name
        for v in event.summary.value:
            if v.metadata.plugin_data.plugin_name == hp_metadata.PLUGIN_NAME:
                if v.tag == hp_metadata.SESSION_START_INFO_TAG:
                    session = hp_metadata.parse_session_start_info_plugin_data(v.metadata.plugin_data.content)
                continue
            scalars[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
            if v.metadata.summary_description:
                descriptions[v.tag] = v.metadata.summary_description
    assert scalars[("eval/H", 0)] == pytest.approx(results["initial"]["H"], abs=1e-6)  # the step-0 evaluation
    final = results["final"]
    for key in ("acc", "U", "S", "H"):
        assert scalars[(f"final/{key}", final["step"])] == pytest.approx(final[key], abs=1e-6)
    assert scalars[("best_on_test/H", final["step"])] == pytest.approx(results["best_on_test"]["best_H"]["H"], abs=1e-6)
    for tag in ("eval/H", "eval/acc", "train/loss", "train/distill", "period/loss", "final/H"):
        assert descriptions.get(tag), f"{tag} has no description"
    assert "harmonic mean" in descriptions["eval/H"]
    assert session is not None and session.group_name == run.name
    hparams = {k: v.string_value or v.number_value or v.bool_value for k, v in session.hparams.items()}
    assert hparams["loss.lambda_cal"] == pytest.approx(0.1) and hparams["data.dataset"] == "demo"


def _tensorboard_tags(folder):
    import tensorflow as tf

    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_resume_reproduces_an_uninterrupted_run(tiny_config, tmp_path):
    config = resolve_config("demo", [tiny_config], [f"data.data_dir={tmp_path / 'data'}"])
    full = run_training(config, run_dir=tmp_path / "full", log=lambda *a: None)

    def stop_at_60(step, **kwargs):
        if step == 60:
            raise Interrupt()

    with pytest.raises(Interrupt):
        run_training(config, run_dir=tmp_path / "cut", log=lambda *a: None, eval_hooks=[stop_at_60])
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 30 and not (tmp_path / "cut" / "model.keras").exists()
    assert train.main(["--run-dir", str(tmp_path / "cut"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    for key in ("acc", "U", "S", "H"):
        assert resumed["final"][key] == full["final"][key]
    assert resumed["final"]["losses"] == full["final"]["losses"]

    import keras

    a = keras.models.load_model(tmp_path / "full" / "model.keras")
    b = keras.models.load_model(tmp_path / "cut" / "model.keras")
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(np.asarray(wa), np.asarray(wb))


def test_seeds_change_the_run(tiny_config, tmp_path):
    base = resolve_config(
        "demo", [tiny_config], [f"data.data_dir={tmp_path / 'data'}", "train.iterations=2", "train.eval_every=2"]
    )
    other = resolve_config(
        "demo",
        [tiny_config],
        [f"data.data_dir={tmp_path / 'data'}", "train.iterations=2", "train.eval_every=2", "train.seed=7"],
    )
    r1 = run_training(base, run_dir=tmp_path / "a", log=lambda *a: None)
    r2 = run_training(other, run_dir=tmp_path / "b", log=lambda *a: None)
    assert r1["final"]["losses"] != r2["final"]["losses"]


def test_schedule_defaults_follow_the_reference():
    config = resolve_config("cub", overrides=["train.iterations=null", "train.eval_every=null"])
    assert schedule(config, 7057) == (7057 * 30 // 50, 141)
    # The reference evaluates after the step of iteration i when i % 141 == 0 (0-based): after
    # steps 1, 142, ..., 4231; msdn-tf adds the last step (the `final` protocol).
    assert config.train.eval_offset == 1
    points = evaluation_steps(4234, 141, config.train.eval_offset)
    assert points[:3] == [1, 142, 283] and points[-2:] == [4231, 4234] and len(points) == 32
    assert evaluation_steps(60, 30) == [30, 60] and evaluation_steps(10, 4) == [4, 8, 10]


def test_reference_evaluation_points_and_resume(tiny_config, tmp_path):
    over = [f"data.data_dir={tmp_path / 'data'}", "train.iterations=10", "train.eval_every=4", "train.eval_offset=1"]
    config = resolve_config("demo", [tiny_config], over)
    full = run_training(config, run_dir=tmp_path / "full", log=lambda *a: None)
    assert [h["step"] for h in full["history"]] == [0, 1, 5, 9, 10]

    def stop_at_9(step, **kwargs):
        if step == 9:
            raise Interrupt()

    with pytest.raises(Interrupt):
        run_training(config, run_dir=tmp_path / "cut", log=lambda *a: None, eval_hooks=[stop_at_9])
    resumed = run_training(config, run_dir=tmp_path / "cut", resume=True, log=lambda *a: None)
    assert [h["step"] for h in resumed["history"]] == [0, 1, 5, 9, 10]
    assert resumed["final"]["losses"] == full["final"]["losses"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--dataset", "cub"], "needs --data-dir"),
        (["--dataset", "cub", "--data-dir", "/nonexistent/folder"], "does not exist"),
        (["--dataset", "demo", "--set", "train.iteratons=3"], "unknown key 'train.iteratons'"),
        (["--resume"], "--resume needs --run-dir"),
    ],
)
def test_bad_input_gives_clear_error_and_nonzero_exit(argv, message, capsys):
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err


def test_existing_run_is_not_overwritten(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    extra = ["--run-dir", str(run), "--set", "train.iterations=2", "--set", "train.eval_every=2"]
    assert train.main(args(tiny_config, tmp_path, *extra)) == 0
    assert train.main(args(tiny_config, tmp_path, *extra)) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_misspelt_key_in_config_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  lamda_cal: 0.2\n")
    assert train.main(["--dataset", "demo", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "loss.lamda_cal" in err


def test_tensorboard_images_option_wires_the_visualisation_hooks(tiny_config, tmp_path):
    config = resolve_config(
        "demo",
        [tiny_config],
        [
            f"data.data_dir={tmp_path / 'data'}",
            "train.iterations=2",
            "train.eval_every=2",
            "train.tensorboard_images=true",
            "train.eval_initial=false",
        ],
    )
    results = run_training(config, run_dir=tmp_path / "run", log=lambda *a: None)
    assert results["initial"] is None and [h["step"] for h in results["history"]] == [2]
    tags = _tensorboard_tags(tmp_path / "run")
    assert {"attention/maps", "gzsl/unseen_predicted_seen", "gzsl/per_class_acc_unseen"} <= tags
