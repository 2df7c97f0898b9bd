"""Selection protocols (reference / final / validation), the validation view, multi-seed and ablations."""

import copy
import json

import numpy as np
import pytest

from msdn_tf.cli import ablations as ablations_cmd
from msdn_tf.cli import protocols as protocols_cmd
from msdn_tf.data.registry import load_dataset
from msdn_tf.errors import ConfigError, DataError, MSDNError
from msdn_tf.experiments import ablations, protocols
from tests.helpers import QUICK_TRAIN, tiny_demo_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocols")
    config = tiny_demo_config(root / "data", *QUICK_TRAIN)
    return config, load_dataset(config), root


class RecordingFeatures:
    """A FeatureSource that records every row read together with the protocol phase at that moment."""

    def __init__(self, source):
        self.source, self.shape = source, source.shape
        self.phase, self.reads = "start", []

    def read(self, indices):
        self.reads.append((self.phase, np.asarray(indices).copy()))
        return self.source.read(indices)

    def rows_read(self, phase):
        chunks = [rows for p, rows in self.reads if p == phase]
        return set(np.concatenate(chunks).tolist()) if chunks else set()


# --------------------------------------------------------------------------- validation view
def test_validation_view_hides_the_test_split(tiny):
    _, data, _ = tiny
    view = protocols.validation_view(data, holdout_fraction=0.2, seed=3)
    rows = view.features.rows
    test_rows = set(data.test_seen_loc) | set(data.test_unseen_loc)
    assert not test_rows & set(rows.tolist())
    assert set(rows.tolist()) == set(data.train_loc) | set(data.val_loc)
    assert view.features.shape[0] == rows.size
    with pytest.raises(DataError, match="row indices must lie in"):
        view.features.read([rows.size])
    # Classes renumbered 0..C'-1: train classes seen, val classes unseen, test-unseen classes gone.
    train_c, val_c = np.unique(data.labels[data.train_loc]), np.unique(data.labels[data.val_loc])
    assert view.num_classes == len(train_c) + len(val_c)
    assert [view.class_names[c] for c in view.unseen_classes] == [data.class_names[c] for c in val_c]
    np.testing.assert_array_equal(view.att[view.unseen_classes], data.att[val_c])
    # Held-out images: some of every train class, none trained on, and the features are the same rows.
    assert set(view.labels[view.test_seen_loc]) == set(view.seen_classes)
    assert not set(view.test_seen_loc) & set(view.trainval_loc)
    np.testing.assert_array_equal(view.features.read([0, 1]), data.features.read(rows[:2]))
    again = protocols.validation_view(data, holdout_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again.features.rows, rows)  # seeded


def test_validation_view_needs_train_and_val(tiny):
    import dataclasses

    _, data, _ = tiny
    bare = dataclasses.replace(data, train_loc=None, val_loc=None)
    with pytest.raises(DataError, match="train_loc'/'val_loc'"):
        protocols.validation_view(bare)


# --------------------------------------------------------------------------- protocols, real training
def test_validation_protocol_reads_the_test_split_only_at_the_end(tiny, tmp_path):
    import dataclasses

    config, data, _ = tiny
    recorder = RecordingFeatures(data.features)
    watched = dataclasses.replace(data, features=recorder)
    phases = []

    def on_phase(name):
        phases.append(name)
        recorder.phase = name

    report = protocols.run_protocol(
        config,
        "validation",
        tmp_path,
        data=watched,
        lambda_grid=[0.05, 0.2],
        gamma_grid=None,
        log=lambda *a: None,
        on_phase=on_phase,
    )
    assert phases == ["selection", "final"]
    test_rows = set(data.test_seen_loc.tolist()) | set(data.test_unseen_loc.tolist())
    selection_rows = recorder.rows_read("selection")
    assert selection_rows and not selection_rows & test_rows
    assert selection_rows <= set(data.train_loc.tolist()) | set(data.val_loc.tolist())
    assert test_rows <= recorder.rows_read("final")
    # The report names its protocol and what was chosen.
    assert report["protocol"] == "validation" and "validation split" in report["note"]
    (seed_result,) = report["seeds"]
    chosen = seed_result["selection"]
    assert chosen["lambda_cal"] in (0.05, 0.2) and chosen["step"] in (6, 12)
    best = max(chosen["candidates"], key=lambda c: c["H"])
    assert chosen["validation"]["H"] == best["H"]
    assert len(chosen["candidates"]) == 4  # 2 lambdas x 2 evaluations after step 0
    final_results = json.loads(
        (tmp_path / "validation" / f"seed_{config.train.seed}" / "final" / "results.json").read_text()
    )
    assert final_results["iterations"] == chosen["step"]
    assert (
        0 <= seed_result["ausuc"] <= 1
        and (tmp_path / "validation" / f"seed_{config.train.seed}" / "final" / "curve.png").is_file()
    )
    md = (tmp_path / "validation.md").read_text()
    assert md.startswith("## protocol: validation")
    # evaluate recognises the protocol's final run and the choices it made.
    from msdn_tf.evaluation import report as evaluate

    final_dir = tmp_path / "validation" / f"seed_{config.train.seed}" / "final"
    metrics = evaluate.evaluate_run(final_dir, gamma=chosen["gamma"], data=data, log=lambda *a: None)
    assert metrics["protocol"] == "validation" and metrics["validation_choice"]["step"] == chosen["step"]
    assert metrics["H"] == pytest.approx(seed_result["H"]) and "reference" not in metrics
    saved = json.loads((tmp_path / "validation.json").read_text())
    assert saved["protocol"] == "validation" and saved["summary"]["H"]["n"] == 1


def test_reference_and_final_protocols_name_themselves(tiny, tmp_path):
    config, data, _ = tiny
    out = protocols.run_protocol(config, "reference,final", tmp_path, data=data, log=lambda *a: None)
    results = json.loads((tmp_path / "train" / f"seed_{config.train.seed}" / "results.json").read_text())
    history = [h for h in results["history"] if h["step"] > 0]
    ref = out["reference"]["seeds"][0]
    assert out["reference"]["protocol"] == "reference"
    assert "selected on the test split, as the reference; optimistic" in out["reference"]["note"]
    assert ref["H"] == max(h["H"] for h in history) and ref["acc"] == max(h["acc"] for h in history)
    assert out["final"]["seeds"][0]["acc"] == results["final"]["acc"] and out["final"]["protocol"] == "final"
    assert (tmp_path / "reference.md").read_text().startswith("## protocol: reference")
    assert (tmp_path / "final.md").read_text().startswith("## protocol: final")
    # A second call reuses the finished run instead of training again.
    lines = []
    protocols.run_protocol(config, "final", tmp_path, data=data, log=lines.append)
    assert any("reusing the finished run" in line for line in lines)
    changed = copy.deepcopy(config)
    changed.optimizer.learning_rate = 0.1
    with pytest.raises(MSDNError, match="different config"):
        protocols.run_protocol(changed, "final", tmp_path, data=data, log=lambda *a: None)


# --------------------------------------------------------------------------- multi-seed, stubbed training
def fake_history(seed):
    """A deterministic fake training history whose numbers depend on the seed."""
    r = np.random.default_rng(seed)
    history = [{"step": 0, "acc": 0.1, "U": 0.0, "S": 0.1, "H": 0.0}]
    for step in (10, 20, 30):
        u, s = r.uniform(0.2, 0.9, size=2)
        history.append(
            {
                "step": step,
                "acc": float(r.uniform(0.3, 0.9)),
                "U": float(u),
                "S": float(s),
                "H": float(2 * u * s / (u + s)),
            }
        )
    return history


def fake_train(config, run_dir=None, resume=False, data=None, log=None, eval_hooks=()):
    history = fake_history(config.train.seed)
    fake_train.calls.append(config.train.seed)
    return {"history": history, "final": history[-1]}


def test_multi_seed_mean_and_std_on_a_stubbed_runner(tiny, tmp_path):
    config, data, _ = tiny
    fake_train.calls = []
    out = protocols.run_protocol(
        config, ["final", "reference"], tmp_path, data=data, seeds=3, train_fn=fake_train, log=lambda *a: None
    )
    seeds = [config.train.seed + i for i in range(3)]
    assert fake_train.calls == seeds  # one training per seed serves both protocols
    finals = [fake_history(s)[-1] for s in seeds]
    for key in ("acc", "U", "S", "H"):
        values = np.array([f[key] for f in finals])
        entry = out["final"]["summary"][key]
        assert entry["values"] == pytest.approx(values.tolist())
        assert entry["mean"] == pytest.approx(values.mean())
        assert entry["std"] == pytest.approx(values.std(ddof=1))
    best_acc = np.array([max(h["acc"] for h in fake_history(s)[1:]) for s in seeds])
    assert out["reference"]["summary"]["acc"]["mean"] == pytest.approx(best_acc.mean())
    md = (tmp_path / "final.md").read_text()
    assert "mean ± std (3 seeds)" in md
    assert protocols.mean_std(out["final"]["summary"]["H"]) in md
    assert protocols.aggregate([{"acc": 0.5}], keys=("acc",))["acc"]["std"] == 0.0


def test_reports_go_below_train_out_dir_by_default(tiny, tmp_path):
    """``python -m msdn_tf.protocols`` / ``ablations`` without --out: <train.out_dir>/<kind>/<dataset>."""
    import copy

    from msdn_tf.experiments import ablations

    config, data, _ = tiny
    config = copy.deepcopy(config)
    config.train.out_dir = str(tmp_path)
    quiet = lambda *a: None  # noqa: E731
    fake_train.calls = []
    protocols.run_protocol(config, "final", data=data, train_fn=fake_train, log=quiet)
    assert (tmp_path / "protocols" / config.data.dataset / "final.json").is_file()
    ablations.run_ablations(config, ["full"], data=data, train_fn=fake_train, log=quiet)
    assert (tmp_path / "ablations" / config.data.dataset / "ablations.json").is_file()


def test_protocol_argument_errors(tiny, tmp_path):
    config, data, _ = tiny
    with pytest.raises(ConfigError, match="unknown protocol 'best'"):
        protocols.run_protocol(config, "best", tmp_path, data=data, train_fn=fake_train)
    with pytest.raises(ConfigError, match="--seeds must be at least 1"):
        protocols.run_protocol(config, "final", tmp_path, data=data, seeds=0, train_fn=fake_train)
    with pytest.raises(ConfigError, match="--lambda-grid"):
        protocols_cmd.parse_floats("0.1,x", "--lambda-grid")
    assert protocols_cmd.main(["--dataset", "imagenet"]) == 2


# --------------------------------------------------------------------------- ablations
def test_every_ablation_row_has_a_config_that_applies(tiny):
    config, _, _ = tiny
    for row in ablations.ROWS:
        ablations.row_config(config, row)
    gap = ablations.row_config(config, "gap")
    assert (gap.model.attention, gap.model.branches, gap.model.fusion_weights, gap.loss.distillation) == (
        "uniform",
        "a2v",
        [1.0, 0.0],
        "none",
    )
    v2a = ablations.row_config(config, "v2a_distill")
    assert v2a.model.branches == "both" and v2a.model.fusion_weights == [0.0, 1.0]
    assert ablations.row_config(config, "jsd").loss.distillation == "jsd"
    with pytest.raises(ConfigError, match="unknown row 'nope'"):
        ablations.parse_rows("gap,nope")
    assert ablations.parse_rows("all") == list(ablations.ROWS)
    assert ablations.parse_rows("full,full_bf16") == ["full", "full_bf16"]  # extra rows only when named
    assert ablations.row_config(config, "full_bf16").train.precision == "mixed_bfloat16"


def test_precision_parity_check():
    def rows(acc_bf16, h_bf16):
        return {
            "rows": {
                "full": {"final": {"acc": {"mean": 0.95}, "H": {"mean": 0.94}}},
                "full_bf16": {"final": {"acc": {"mean": acc_bf16}, "H": {"mean": h_bf16}}},
            }
        }

    assert ablations.precision_check(rows(0.945, 0.949), log=lambda *a: None)
    assert not ablations.precision_check(rows(0.935, 0.94), log=lambda *a: None)
    assert not ablations.precision_check(rows(0.95, 0.9501 + 0.01), log=lambda *a: None)
    with pytest.raises(ConfigError, match="--check-precision needs the rows full and full_bf16"):
        ablations.precision_check({"rows": {"full": {}}})


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--rows", "gap,nope"], "unknown row 'nope'"),
        (["--rows", "full", "--check"], "needs the rows gap and full"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    ],
)
def test_ablations_cli_errors(argv, message, capsys):
    assert ablations_cmd.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_ablations_report_and_quality_check_on_a_stubbed_runner(tiny, tmp_path):
    config, data, _ = tiny
    chance = 0.1  # as on the demo (10 unseen classes); the tiny data's 3 unseen would make 3x chance = 100%

    def train(acc_of_row):
        def fn(cfg, **kwargs):
            row = "gap" if cfg.model.attention == "uniform" else "full"
            acc = acc_of_row[row] + 0.01 * (cfg.train.seed - config.train.seed)
            entry = {"step": 10, "acc": acc, "U": 0.5, "S": 0.5, "H": 0.5}
            return {"history": [{**entry, "step": 0}, entry], "final": entry}

        return fn

    good = ablations.run_ablations(
        config,
        ["gap", "full"],
        tmp_path / "good",
        seeds=2,
        data=data,
        train_fn=train({"gap": 0.5, "full": 0.9}),
        log=lambda *a: None,
    )
    assert good["rows"]["full"]["final"]["acc"]["mean"] == pytest.approx(0.905)
    assert good["rows"]["full"]["final"]["acc"]["std"] == pytest.approx(np.std([0.9, 0.91], ddof=1))
    md = (tmp_path / "good" / "ablations.md").read_text()
    assert "## protocol: final" in md and "[ref*]" in md and "90.50 ± 0.71" in md
    assert json.loads((tmp_path / "good" / "ablations.json").read_text())["rows"]["gap"]["label"].startswith("baseline")
    assert good["chance_acc"] == pytest.approx(1 / len(data.unseen_classes))
    good["chance_acc"] = chance
    lines = []
    assert ablations.quality_check(good, log=lines.append) and all(line.startswith("PASS") for line in lines)
    # Below 3x chance on one seed, or not 5 points above GAP: the check fails.
    weak = ablations.run_ablations(
        config,
        ["gap", "full"],
        tmp_path / "weak",
        seeds=2,
        data=data,
        train_fn=train({"gap": 0.87, "full": 3 * chance - 0.005}),
        log=lambda *a: None,
    )
    weak["chance_acc"] = chance
    lines = []
    assert not ablations.quality_check(weak, log=lines.append)
    assert sum(line.startswith("FAIL") for line in lines) == 2
    with pytest.raises(ConfigError, match="needs the rows gap and full"):
        ablations.quality_check({"rows": {"full": {}}, "chance_acc": 0.1})
