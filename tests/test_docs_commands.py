"""Every shell command in README.md and docs/*.md is run by a test, or marked as needing what is not here.

A command is a line (with its ``\\`` continuations) of a fenced ``bash``/``sh`` block, or of an
unlabelled block when it starts like a command. A command that needs data, a machine or time
that the tests do not have carries a trailing ``# needs: ...`` comment saying what. Every other
command must be in :data:`RUN`, and ``test_documented_commands_run_as_written`` runs them, as
written, in a scratch folder: ``python`` is the test's interpreter, ``~`` a scratch home, and the
recipes (``MSDN_CONFIG_DIR``) are the shipped ones with a tiny demo, so each training takes
seconds. The only rewrites are listed in :data:`REWRITES` (a free port for 8500, ``DIR`` of
docs/custom_data.md).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers import REPO, TINY_DEMO_FIELDS, TINY_TRAIN

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NEEDS = "# needs:"
COMMAND_START = re.compile(r"^(python3? |make |KERAS_BACKEND=|TF_CONFIG=|tensorboard |pip |export |bash |msdn-|/)")
SHELL_BLOCKS = ("bash", "sh", "shell", "console")


def documented_commands():
    """``[(file name, line number, command, trailing comment)]`` of every documented command."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        info, block = None, False
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("```"):
                block, info = (not block), line[3:].strip()
                i += 1
                continue
            text = line.strip()
            if not block or info not in SHELL_BLOCKS + ("",) or not text or text.startswith("#"):
                i += 1
                continue
            if info == "" and not COMMAND_START.match(text):
                i += 1
                continue
            start, parts = i, [line.rstrip()]
            while parts[-1].endswith("\\") and i + 1 < len(lines):
                i += 1
                parts.append(lines[i].rstrip())
            joined = " ".join(p.rstrip("\\").strip() for p in parts)
            command, _, comment = joined.partition("  #")
            if not comment and " # " in joined:
                command, _, comment = joined.partition(" # ")
            found.append((path.name, start + 1, " ".join(command.split()), ("#" + comment).strip() if comment else ""))
            i += 1
    return found


# The commands the tests run, in this order (later ones use what earlier ones wrote).
RUN = [
    # README.md: the tour and the training variants
    "python -m msdn_tf.train --dataset demo --run-dir runs/demo",
    "python -m msdn_tf.evaluate --run runs/demo --calibration-curve",
    "python -m msdn_tf.visualize attention --run runs/demo --index 3 --out runs/demo/attention.png",
    "python -m msdn_tf.export --run runs/demo --out export/models/msdn_demo",
    "python -m msdn_tf.serve_local --model_base_path export/models/msdn_demo --model_name msdn_demo --port 8500 &",
    "python -m msdn_tf.client --server localhost:8500 --model msdn_demo --features ~/.cache/msdn_tf/demo/demo_*.hdf5 "
    "--rows 0 1 --metadata export/models/msdn_demo/msdn_metadata.json",
    "python -m msdn_tf.train --dataset demo",
    "python -m msdn_tf.train --dataset demo --strategy mirrored",
    "python -m msdn_tf.train --dataset demo --precision auto",
    "KERAS_BACKEND=jax python -m msdn_tf.train --dataset demo",
    # docs/backends.md
    "KERAS_BACKEND=jax python -m msdn_tf.train --dataset demo --run-dir runs/demo-jax",
    "python -m msdn_tf.export --run runs/demo-jax --out export/models/msdn_demo_jax",
    # docs/visualize.md
    "python -m msdn_tf.visualize attention --run runs/demo --index 3 --split test_unseen --out demo_att.png",
    "python -m msdn_tf.visualize embeddings --run runs/demo",
    # docs/zero_shot.md: classes added after training, the held-out-classes experiment
    "python -m msdn_tf.train --dataset demo --run-dir runs/demo-zs --set data.data_dir=data/demo",
    'python -c \'import csv, json; names = json.load(open("runs/demo-zs/class_semantics.json"))["attribute_names"]; '
    'w = csv.writer(open("new_classes.csv", "w", newline="")); w.writerow(["class", *names]); '
    'w.writerow(["new_bird_00", 80, 60, 40, *[0] * (len(names) - 3)])\'',
    "python -m msdn_tf.export --run runs/demo-zs --out export/models/msdn_zs --version 2 --classes new_classes.csv",
    "python -m msdn_tf.held_out --dataset demo --set data.data_dir=data/demo",
    "python -m msdn_tf.evaluate --run runs/held_out/demo/added --classes runs/held_out/demo/held_out_classes.csv "
    "--data-dir data/demo",
    # docs/custom_data.md: the example, then the same run through the separate commands
    "python -m msdn_tf.custom example --out /tmp/shapes",
    "python -m msdn_tf.custom prepare --spec DIR/source/dataset.yaml --weights none --image-size 96 --out DIR/data2",
    "python -m msdn_tf.custom run --data-dir DIR/data2 --out DIR/run2 --iterations 300 "
    "--set optimizer.learning_rate=0.001 --set train.eval_every=100 --verify-export --visualize",
]


def test_every_documented_command_is_run_or_marked():
    problems = []
    commands = documented_commands()
    assert len(commands) > 40, "the extraction found too few commands"
    for name, line, command, comment in commands:
        if comment.startswith(NEEDS):
            if command in RUN:
                problems.append(f"{name}:{line}: {command!r} is run by the tests, but marked {comment!r}")
            elif len(comment) <= len(NEEDS) + 3:
                problems.append(f"{name}:{line}: say what {command!r} needs")
        elif command not in RUN:
            problems.append(
                f"{name}:{line}: {command!r} is neither run by tests/test_docs_commands.py nor '{NEEDS} ...'"
            )
    documented = {c for _, _, c, _ in commands}
    problems += [f"RUN lists {c!r}, which no document shows" for c in RUN if c not in documented]
    assert not problems, "\n".join(problems)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _scratch(tmp_path):
    """``(work folder, environment)``: tiny recipes, a scratch home and ``python`` on PATH."""
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    demo = yaml.safe_load((configs / "demo.yaml").read_text())
    demo["demo"] = dict(TINY_DEMO_FIELDS)
    demo["train"] = {**demo["train"], **TINY_TRAIN["train"], "iterations": 4, "eval_every": 2}
    (configs / "demo.yaml").write_text(yaml.safe_dump(demo, sort_keys=False))
    custom = yaml.safe_load((configs / "custom.yaml").read_text())
    custom.setdefault("train", {})["iterations"] = 4
    (configs / "custom.yaml").write_text(yaml.safe_dump(custom, sort_keys=False))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python"  # a script, not a link: a venv's python finds its packages from its own path
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "TF_CONFIG", "KERAS_BACKEND")}
    env.update(
        HOME=str(home),
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        MSDN_CONFIG_DIR=str(configs),
    )
    work = tmp_path / "work"
    work.mkdir()
    return work, env


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MSDN_TEST_DOCS") != "1",
    reason="runs every documented command (about 25 trainings and exports, minutes): set MSDN_TEST_DOCS=1",
)
def test_documented_commands_run_as_written(tmp_path):
    work, env = _scratch(tmp_path)
    port = str(_free_port())
    shapes = tmp_path / "shapes"
    rewrites = {"8500": port, "/tmp/shapes": str(shapes), "DIR/": f"{shapes}/"}
    server = None
    try:
        for command in RUN:
            line = command
            for old, new in rewrites.items():
                line = line.replace(old, new)
            if line.endswith("&"):  # a server: start it, wait until it listens
                server = subprocess.Popen(
                    ["bash", "-c", line[:-1]], cwd=work, env=env, stderr=subprocess.PIPE, text=True
                )
                deadline = time.time() + 240
                while time.time() < deadline:
                    with socket.socket() as s:
                        if s.connect_ex(("localhost", int(port))) == 0:
                            break
                    assert server.poll() is None, server.stderr.read()
                    time.sleep(0.5)
                continue
            proc = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    assert (work / "runs" / "demo" / "eval" / "curve.png").is_file()
    assert (work / "demo_att.png").is_file() and (work / "runs" / "demo" / "attention.png").is_file()
    assert (shapes / "run" / "model.keras").is_file() and (shapes / "run2" / "model.keras").is_file()
