"""``pip install .`` gives a working product: the wheel carries the recipes, the commands find them anywhere.

The wheel is built from a copy of the checkout (its tracked and not-ignored files) and installed
with ``pip install --no-deps --target`` into a folder outside the checkout; the commands then run
from another folder with that target first on ``PYTHONPATH`` (TensorFlow and the other
dependencies come from the running interpreter). Building with ``--no-build-isolation`` needs no
network.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, write_tiny_yaml

pytestmark = pytest.mark.slow


def _checkout_copy(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, files.split("\0")):
        src = REPO / name
        if not src.exists() and not src.is_symlink():  # deleted in the work tree
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        else:
            shutil.copy2(src, target)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(site, bin)``: the installed wheel's import folder and its console scripts."""
    root = tmp_path_factory.mktemp("pip")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files make the source tree")
    source = _checkout_copy(root / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist")],
        check=True,
        capture_output=True,
    )
    (wheel,) = (root / "dist").glob("msdn_tf-*.whl")
    site = root / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True, capture_output=True
    )
    return site, site / "bin"


def _run(installed, tmp_path, script, *args):
    site, bin_dir = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MSDN_CONFIG_DIR")}
    env["PYTHONPATH"] = str(site)
    work = tmp_path / "elsewhere"
    work.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, str(bin_dir / script), *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_installed_package_is_the_wheel_and_holds_the_recipes(installed, tmp_path):
    site, _ = installed
    for name in ("demo", "cub", "sun", "awa2", "custom"):
        assert (site / "msdn_tf" / "configs" / f"{name}.yaml").is_file() and not (
            site / "msdn_tf" / "configs"
        ).is_symlink()
    assert (site / "msdn_tf" / "configs" / "ablations" / "full.yaml").is_file()
    assert (site / "msdn_tf" / "serving" / "cc_loader.cc").is_file()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run(
        [sys.executable, "-c", "import msdn_tf.config as c; print(c.__file__); print(c.CONFIG_DIR)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    module, config_dir = proc.stdout.split()
    assert Path(module).is_relative_to(site) and Path(config_dir).is_relative_to(site)


@pytest.mark.parametrize(
    "dataset,expected",
    [
        ("sun", {"loss": {"lambda_cal": 0.0001, "distill_weight": 0.01}, "train": {"seed": 2339, "iterations": 14448}}),
        ("awa2", {"loss": {"lambda_cal": 0.12, "distill_weight": 1e-7}, "train": {"seed": 87778, "iterations": 23527}}),
    ],
)
def test_msdn_train_resolves_the_shipped_recipe_from_any_folder(installed, tmp_path, dataset, expected):
    proc = _run(installed, tmp_path, "msdn-train", "--dataset", dataset, "--print-config")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    for section, values in expected.items():
        for key, value in values.items():
            assert resolved[section][key] == pytest.approx(value), (section, key)
    assert resolved["data"]["sampler"] == "class_balanced"


def test_a_missing_recipe_is_an_error_not_the_defaults(installed, tmp_path):
    site, _ = installed
    recipe = site / "msdn_tf" / "configs" / "sun.yaml"
    saved = recipe.read_bytes()
    recipe.unlink()
    try:
        proc = _run(installed, tmp_path, "msdn-train", "--dataset", "sun", "--print-config")
    finally:
        recipe.write_bytes(saved)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {recipe}: the recipe of --dataset sun is missing")


def test_a_short_demo_run_with_the_installed_commands(installed, tmp_path):
    tiny = write_tiny_yaml(tmp_path, iterations=4, eval_every=2)
    run = tmp_path / "run"
    flags = ["--dataset", "demo", "--config", str(tiny), "--data-dir", str(tmp_path / "data"), "--run-dir", str(run)]
    proc = _run(installed, tmp_path, "msdn-train", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"]["lambda_cal"] == 0.1 and saved["train"]["iterations"] == 4  # demo recipe + tiny file
    assert (run / "model.keras").is_file() and (run / "results.json").is_file()
