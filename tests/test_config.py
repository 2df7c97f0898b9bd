"""Typed config: dataset files, overrides, unknown keys and wrong types."""

from pathlib import Path

import pytest
import yaml

from msdn_tf.config import CONFIG_DIR, Config, from_dict, resolve_config, to_yaml
from msdn_tf.errors import ConfigError
from tests.helpers import REPO


@pytest.mark.parametrize(
    "dataset,lam,wd,seed,its,every,w,momentum,sampler,norm",
    [
        ("cub", 0.1, 0.001, 214, 4234, 141, [0.9, 0.1], 0.9, "random", False),
        ("sun", 0.0001, 0.01, 2339, 14448, 206, [0.7, 0.3], 0.9, "class_balanced", False),
        ("awa2", 0.12, 1e-7, 87778, 23527, 470, [1.0, 0.0], 0.0, "class_balanced", True),
    ],
)
def test_dataset_files_hold_reference_hyperparameters(dataset, lam, wd, seed, its, every, w, momentum, sampler, norm):
    c = resolve_config(dataset)
    assert (c.loss.lambda_cal, c.loss.distill_weight, c.train.seed) == (lam, wd, seed)
    assert (c.train.iterations, c.train.eval_every, c.model.fusion_weights) == (its, every, w)
    assert (c.optimizer.momentum, c.data.sampler, c.model.normalize_attribute_vectors) == (momentum, sampler, norm)
    assert (c.optimizer.learning_rate, c.optimizer.rho, c.optimizer.epsilon, c.optimizer.weight_decay) == (
        1e-4,
        0.99,
        1e-8,
        1e-4,
    )


def test_every_config_file_resolves():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"demo", "cub", "sun", "awa2"} <= set(names)
    for name in names:
        resolve_config(name)


def test_overrides_apply_last_and_are_typed(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  iterations: 7\nloss:\n  lambda_cal: 0.5\n")
    c = resolve_config("cub", [extra], ["train.iterations=9", "model.fusion_weights=[1, 0]", "loss.distillation=jsd"])
    assert c.train.iterations == 9 and c.loss.lambda_cal == 0.5
    assert c.model.fusion_weights == [1.0, 0.0] and c.loss.distillation == "jsd"


def test_misspelt_key_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iteratons: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.iteratons"):
        resolve_config("demo", [bad])
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        resolve_config("demo", overrides=["trian.iterations=5"])
    with pytest.raises(ConfigError, match="expected an integer"):
        resolve_config("demo", overrides=["train.iterations=many"])
    with pytest.raises(ConfigError, match="expected true or false"):
        resolve_config("demo", overrides=["train.jit_compile=3"])
    with pytest.raises(ConfigError, match="must be one of"):
        resolve_config("demo", overrides=["data.sampler=shuffled"])
    with pytest.raises(ConfigError, match="section.key=value"):
        resolve_config("demo", overrides=["iterations=5"])
    with pytest.raises(ConfigError, match="not found"):
        resolve_config("demo", [tmp_path / "missing.yaml"])


def test_resolved_config_round_trips_through_yaml():
    c = resolve_config("sun", overrides=["train.iterations=3"])
    again = from_dict(yaml.safe_load(to_yaml(c)))
    assert again == c
    assert Config() != c


def test_a_missing_builtin_recipe_is_an_error(tmp_path, monkeypatch):
    import msdn_tf.config as config_module

    monkeypatch.setattr(config_module, "CONFIG_DIR", tmp_path)
    for name in config_module.RECIPE_DATASETS:
        with pytest.raises(ConfigError, match=rf"{name}\.yaml: the recipe of --dataset {name} is missing"):
            resolve_config(name)
    assert resolve_config("my_own").data.dataset == "my_own"  # a dataset you register may have no recipe
    assert resolve_config("sun", use_dataset_file=False).loss.lambda_cal == Config().loss.lambda_cal


def test_the_recipes_are_package_data():
    import msdn_tf

    assert CONFIG_DIR.resolve() == (REPO / "configs").resolve()
    assert (Path(msdn_tf.__file__).parent / "configs" / "sun.yaml").is_file()


def test_a_demo_map_below_3x3_is_a_config_error():
    with pytest.raises(ConfigError, match=r"demo\.map_size' must be >= 3"):
        resolve_config("demo", overrides=["demo.map_size=2"])
