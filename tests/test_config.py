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


# --------------------------------------------------------------------------- budgets (issue 21 §2, §4)


def _alias_bomb(levels=9, width=9):
    """A YAML "billion laughs" inside an Any-typed key: ``width ** levels`` strings once expanded."""
    names = "abcdefghijklmnop"
    parts = ["&a [%s]" % ",".join(['"lol"'] * width)]
    for i in range(1, levels):
        parts.append("&%s [%s]" % (names[i], ",".join(["*" + names[i - 1]] * width)))
    return "data:\n  on_device: [%s]\n" % ",\n    ".join(parts)


def test_alias_bomb_is_refused_at_once(tmp_path):
    # The example (9 levels of 9 aliases, under 600 bytes): main spends minutes
    # and gigabytes printing it in the error. A subprocess keeps a regression from hanging.
    import subprocess
    import sys

    from tests.helpers import REPO

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    assert bomb.stat().st_size < 600
    code = (
        "import sys\nfrom msdn_tf.config import resolve_config\n"
        "try:\n    resolve_config('demo', [sys.argv[1]])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=60, cwd=str(REPO)
    )
    assert run.stdout.startswith("ConfigError %s: line 6: the YAML expands to more than 10000 nodes" % bomb), (
        run.stdout[:500] + run.stderr[-2000:]
    )


def test_small_alias_bomb_bounded_memory_and_message(tmp_path):
    import tracemalloc

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb(levels=6))  # 531441 strings once expanded
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="MAX_YAML_NODES") as info:
            resolve_config("demo", [bomb])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 << 20, peak
    assert len(str(info.value)) < 300
    # The same through --set.
    value = _alias_bomb(levels=6).split("on_device: ", 1)[1].replace("\n", " ")
    with pytest.raises(ConfigError, match=r"--set data.on_device=.*MAX_YAML_NODES"):
        resolve_config("demo", overrides=["data.on_device=" + value])


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  seed: 1\n  seed: 2\n", r"line 3: the YAML key 'train.seed' appears twice \(lines 2 and 3\)"),
        (
            "train:\n  seed: 1\nmodel:\n  bias: 1.0\ntrain:\n  epochs: 3\n",
            r"line 5: the YAML key 'train' appears twice \(lines 1 and 5\)",
        ),
        ("train: {seed: 1, 'seed': 2}\n", r"key 'train.seed' appears twice"),
        ("data:\n  on_device: " + "[" * 40 + "]" * 40 + "\n", r"line 2: the YAML is nested deeper than 32 levels"),
        (  # libyaml's parser stops at 1000 levels before our check sees them
            "data:\n  on_device: " + "[" * 5000 + "]" * 5000 + "\n",
            r"nested deeper than 32 levels|exceeded maximum nesting depth",
        ),
        ("data:\n  on_device: &x [1, *x]\n", r"alias \*x inside the collection it names"),
        ("data:\n  data_dir: " + "x" * 70000 + "\n", r"value of 70000 characters, over the limit of 65536"),
    ],
    ids=["key-twice", "section-twice", "flow-key-twice", "deep", "very-deep", "recursive-alias", "long-scalar"],
)
def test_yaml_budgets_and_duplicates_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "user.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        resolve_config("demo", [path])
    assert str(info.value).startswith(str(path) + ": ")
    assert len(str(info.value)) < 300


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("train: &t {seed: 5, epochs: 2}\nloss: {lambda_cal: 0.2}\n")
    assert resolve_config("demo", [path]).train.seed == 5
    path.write_text("data: {on_device: {<<: {a: 1}, a: 2}}\n")
    with pytest.raises(ConfigError, match="data.on_device"):  # loaded fine; refused by the value check
        resolve_config("demo", [path])


def test_config_file_size_and_encoding(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 110_000)  # 1.1 MB of comments
    with pytest.raises(ConfigError, match=r"config file of 1100000 bytes is over the limit of 1048576 bytes"):
        resolve_config("demo", [big])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  run_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml: config file is not UTF-8 text \(byte 0xe9 at offset 22\)"):
        resolve_config("demo", [latin])
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbftrain:\n  run_name: caf\xc3\xa9\n")
    assert resolve_config("demo", [bom]).train.run_name == "caf\xe9"


def test_messages_do_not_repr_huge_values(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("train:\n  seed: [%s]\n" % ", ".join(["123456789"] * 5000))
    with pytest.raises(ConfigError, match="expected an integer, got") as info:
        resolve_config("demo", [path])
    assert len(str(info.value)) < 400 and "(5000 items)" in str(info.value)
    with pytest.raises(ConfigError, match="must be one of") as info:
        resolve_config("demo", overrides=["data.on_device=" + "x" * 60000])
    assert len(str(info.value)) < 600


def test_a_demo_map_below_3x3_is_a_config_error():
    with pytest.raises(ConfigError, match=r"demo\.map_size' must be >= 3"):
        resolve_config("demo", overrides=["demo.map_size=2"])
