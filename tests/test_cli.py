"""The command wing's shared helper (msdn_tf.cli.common), and what a plain ``import msdn_tf`` does.

* a command hides TensorFlow's C++ start-up noise by default and shows it under ``--verbose``
  (and ``MSDN_TF_VERBOSE=1``), while its own error line still shows;
* if the captured import fails, what it wrote is printed;
* ``import msdn_tf`` imports neither Keras nor TensorFlow, whoever imports it; ``import msdn_tf.model``
  is enough for ``keras.saving.load_model`` on a run's model.keras.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO

# The lines TensorFlow writes at start-up on a machine without a GPU (some only on some machines).
NOISE = (
    "All log messages before absl::InitializeLog()",
    "oneDNN custom operations",
    "cudart_stub.cc",
    "failed call to cuInit",
    "use_unbounded_threadpool",
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "MSDN_TF_VERBOSE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run(args, **extra):
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(**extra), capture_output=True, text=True, timeout=300
    )


# A cheap command that imports TensorFlow and then fails with msdn-tf's own one-line error.
SERVING_BENCH_MISSING = ["-m", "msdn_tf.bench_serving", "--export", "/nonexistent/msdn-export"]


def test_a_command_hides_tensorflow_startup_noise_but_not_its_own_error():
    proc = _run(SERVING_BENCH_MISSING)
    assert proc.returncode == 2, proc.stderr
    assert "error: " in proc.stderr and "/nonexistent/msdn-export" in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)], proc.stderr


def test_verbose_shows_tensorflow_startup_lines(monkeypatch):
    proc = _run(SERVING_BENCH_MISSING + ["--verbose"])
    assert proc.returncode == 2
    assert "error: " in proc.stderr
    # TensorFlow's start-up lines differ between builds/machines; every 2.x CPU build writes
    # one of these at import when its C++ log is not silenced.
    assert "absl::InitializeLog()" in proc.stderr or "I0000" in proc.stderr, proc.stderr
    from msdn_tf.cli.common import verbose_requested

    monkeypatch.setenv("MSDN_TF_VERBOSE", "1")
    assert verbose_requested([])
    monkeypatch.setenv("MSDN_TF_VERBOSE", "0")
    assert not verbose_requested([]) and verbose_requested(["--verbose"])


def test_cli_main_takes_verbose_out_and_keeps_the_error_tail():
    from msdn_tf.cli.common import cli_main
    from msdn_tf.errors import DataError

    seen = []

    @cli_main
    def main(argv=None):
        seen.append(argv)
        raise DataError("x.h5: key 'att' missing")

    assert main(["--dataset", "demo", "--verbose"]) == 2
    assert seen == [["--dataset", "demo"]]
    assert cli_main(lambda argv: 0)(["--verbose"]) == 0


def test_a_failed_captured_import_prints_what_it_wrote():
    code = (
        "import os\nfrom msdn_tf.cli.common import stderr_fd_captured\n"
        "with stderr_fd_captured():\n    os.write(2, b'written-while-captured\\n')\n    raise ImportError('boom')\n"
    )
    proc = _run(["-c", code])
    assert proc.returncode == 1
    assert "written-while-captured" in proc.stderr and "ImportError: boom" in proc.stderr
    ok = _run(["-c", code.replace("    raise ImportError('boom')\n", "")])
    assert ok.returncode == 0 and "written-while-captured" not in ok.stderr


def test_common_flags_parse():
    import argparse

    from msdn_tf.cli.common import add_common_flags

    args = add_common_flags(argparse.ArgumentParser(), dataset_help="dataset").parse_args(
        ["--dataset", "cub", "--data-dir", "d", "--config", "a.yaml", "--set", "train.seed=1", "--verbose"]
    )
    assert (args.dataset, args.data_dir, args.config, args.set, args.verbose) == (
        "cub",
        "d",
        ["a.yaml"],
        ["train.seed=1"],
        True,
    )


def test_importing_the_model_module_registers_the_keras_objects_for_load_model(tmp_path):
    import keras

    from msdn_tf.model import build_msdn
    from msdn_tf.optimizers import TorchRMSprop

    rng = np.random.default_rng(0)
    model = build_msdn(rng.random((4, 3)), rng.normal(size=(3, 6)), [0, 1, 2], [3], feature_dim=5, num_regions=2)
    model.compile(optimizer=TorchRMSprop(learning_rate=1e-3))
    path = tmp_path / "model.keras"
    keras.saving.save_model(model, path)
    proc = _run(
        [
            "-c",
            "import sys, keras, msdn_tf.model, msdn_tf.optimizers\n"
            "m = keras.saving.load_model(sys.argv[1])\n"
            "print(type(m).__name__, type(m.optimizer).__name__)",
            str(path),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["MSDN", "TorchRMSprop"]
    proc = _run(["-c", "import sys, msdn_tf\nprint(type(msdn_tf.load_model(sys.argv[1])).__name__)", str(path)])
    assert proc.returncode == 0 and proc.stdout.split() == ["MSDN"], proc.stderr[-3000:]


@pytest.mark.parametrize("argv0", ["-m", "/venv/bin/msdn-train", "/x/script.py", "-c"])
def test_import_msdn_tf_is_the_same_for_every_importer(argv0):
    # No sys.argv-dependent behaviour: no Keras, no TensorFlow, no hook on stderr, whoever imports it.
    code = (
        "import sys\nsys.argv[0] = sys.argv[1]\nimport msdn_tf\n"
        "print(msdn_tf.__version__, 'keras' in sys.modules, 'tensorflow' in sys.modules, len(sys.meta_path))"
    )
    plain = _run(["-c", "import sys\nprint(len(sys.meta_path))"])
    proc = _run(["-c", code, argv0])
    assert proc.returncode == 0, proc.stderr
    version, keras_loaded, tf_loaded, finders = proc.stdout.split()
    assert (keras_loaded, tf_loaded) == ("False", "False")
    assert finders == plain.stdout.strip()


def test_scripts_import_only_names_the_package_has():
    """scripts/*.py are not imported by the suite; their ``from msdn_tf... import NAME`` lines must still resolve."""
    import ast
    import importlib

    missing = []
    for script in sorted((REPO / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("msdn_tf"):
                module = importlib.import_module(node.module)
                missing += [f"{script.name}: {node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)]
    assert not missing


def test_test_modules_never_import_each_other():
    """What tests share lives in tests/helpers.py and tests/conftest.py (docs/architecture.md)."""
    import ast

    found = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[-1].startswith("test_")]
    assert not found
