"""Training checkpoints: step-stamped weights and optimizer state, committed by an atomic ``state.json``.

``checkpoint/`` of a run directory holds ``step_NNNNNNNN.weights.npz``,
``step_NNNNNNNN.optimizer.npz`` and ``state.json`` (step, file names, the evaluation
history and the record of resumes). ``python -m msdn_tf.train --resume`` continues from it.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from msdn_tf.errors import MSDNError
from msdn_tf.limits import MAX_JSON_BYTES, check_file_size, check_npz
from msdn_tf.utils import atomic_path, write_json


class Checkpointer:
    """Step-stamped weights and optimizer state, committed by an atomic ``state.json``.

    A crash at any point leaves the previous checkpoint intact: the new files are
    written first, ``state.json`` is replaced last, and older files are removed after.
    """

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "checkpoint"
        self.state_path = self.dir / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def save(self, model, step: int, history: list, resumes: list = (), problem=None) -> None:
        """Write the checkpoint of ``step``; ``problem`` (:func:`~msdn_tf.training.resume.data_problem`)
        is what ``--resume`` compares the data with."""
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = f"step_{step:08d}"
        try:
            # numpy, not Keras' HDF5 weights file: HDF5 keeps a failed handle open and the
            # process then crashes at exit (signal 11) on a full disk instead of exiting with 2
            with atomic_path(self.dir / f"{stem}.weights.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, *[np.asarray(v) for v in model.weights])
            with atomic_path(self.dir / f"{stem}.optimizer.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, *[np.asarray(v) for v in model.optimizer.variables])
            write_json(
                self.state_path,
                {
                    "step": step,
                    "weights": f"{stem}.weights.npz",
                    "optimizer": f"{stem}.optimizer.npz",
                    "history": history,
                    "resumes": list(resumes),
                    **({"problem": problem} if problem is not None else {}),
                },
            )
        except BaseException:
            # state.json still names the previous checkpoint: drop this one's partial files
            current = self.state_path.read_text() if self.state_path.is_file() else ""
            if stem not in current:
                for new in self.dir.glob(f"{stem}.*"):
                    new.unlink()
            raise
        for old in self.dir.glob("step_*"):
            if not old.name.startswith(stem):
                old.unlink()

    def read_state(self) -> dict:
        """``state.json``, checked: a clear error names the file if it is corrupt or incomplete."""
        check_file_size(self.state_path, MAX_JSON_BYTES, "checkpoint state", MSDNError, "MAX_JSON_BYTES")
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
            raise MSDNError(
                f"{self.state_path}: corrupt checkpoint state ({exc}); the run cannot be "
                "resumed from it: start a new run (another --run-dir)"
            ) from exc
        missing = [
            k for k in ("step", "weights", "optimizer", "history") if not isinstance(state, dict) or k not in state
        ]
        if missing:
            raise MSDNError(
                f"{self.state_path}: corrupt checkpoint state (missing {', '.join(missing)}); "
                "start a new run (another --run-dir)"
            )
        problem = _state_problem(state)
        if problem:
            raise MSDNError(
                f"{self.state_path}: corrupt checkpoint state ({problem}); the run cannot be resumed from it: "
                "restore the file or start a new run (another --run-dir)"
            )
        for key in ("weights", "optimizer"):
            if not (self.dir / state[key]).is_file():
                raise MSDNError(
                    f"{self.dir / state[key]}: the checkpoint's {key} file is missing; "
                    "the run cannot be resumed: restore the file or start a new run"
                )
        return state

    def restore(self, model) -> dict:
        state = self.read_state()
        path = self.dir / state["weights"]
        try:
            if path.name.endswith(".h5"):  # checkpoints written before the .npz format
                model.load_weights(path)
            else:
                assign_all(model.weights, load_arrays(path), path, "model weights")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise MSDNError(
                f"{path}: unreadable checkpoint weights ({_first_line(exc)}); restore the file or start a new run"
            ) from exc
        model.optimizer.build(model.trainable_variables)
        path = self.dir / state["optimizer"]
        try:
            values = load_arrays(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise MSDNError(
                f"{path}: unreadable optimizer state ({_first_line(exc)}); restore the file or start a new run"
            ) from exc
        assign_all(model.optimizer.variables, values, path, "optimizer variables")
        return state


_STEM = r"step_\d{8}"
_NAMES = {"weights": rf"{_STEM}\.weights\.(npz|h5)", "optimizer": rf"{_STEM}\.optimizer\.npz"}


def _state_problem(state: dict):
    """What is wrong with a ``state.json`` that parsed, or None (a tampered file is refused, not used)."""
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"'step' must be a whole number >= 0, got {str(step)[:40]!r}"
    for key, pattern in _NAMES.items():
        if not isinstance(state[key], str) or not re.fullmatch(pattern, state[key]):
            got = str(state[key])[:60]
            return f"'{key}' must name a file step_NNNNNNNN.{key}.npz in the checkpoint folder, got {got!r}"
    if not isinstance(state["history"], list) or not all(isinstance(h, dict) for h in state["history"]):
        return "'history' must be a list of evaluation records"
    if not isinstance(state.get("resumes", []), list):
        return "'resumes' must be a list"
    return None


def _first_line(exc) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__) or type(exc).__name__


def load_arrays(path) -> list:
    """The arrays ``arr_0, arr_1, ...`` of an ``.npz`` written by :meth:`Checkpointer.save` (no pickles)."""
    check_npz(path)  # each array's declared size against its stored bytes, before inflating it
    with np.load(path, allow_pickle=False) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def assign_all(variables, values, path, what) -> None:
    if len(values) != len(variables):
        raise MSDNError(f"{path}: holds {len(values)} {what}, the model has {len(variables)}")
    for var, value in zip(variables, values):
        if tuple(value.shape) != tuple(var.shape):
            raise MSDNError(
                f"{path}: {what} '{var.path}' has shape {value.shape} in the checkpoint, "
                f"{tuple(var.shape)} in the model"
            )
        if value.dtype.kind not in "fiu":
            raise MSDNError(f"{path}: {what} '{var.path}' holds {value.dtype} values, not numbers")
        if not np.isfinite(value).all():
            raise MSDNError(
                f"{path}: {what} '{var.path}' holds NaN or infinite values; restore the file or start a new run"
            )
        var.assign(value)


def checkpoint_note(checkpointer) -> str:
    """One sentence for error messages: which checkpoint is intact, or that none was written."""
    if checkpointer.exists():
        try:
            step = json.loads(checkpointer.state_path.read_text())["step"]
            return f"The checkpoint of step {step} in {checkpointer.dir} is intact"
        except (OSError, ValueError, KeyError):
            pass
    return "No checkpoint was written"
