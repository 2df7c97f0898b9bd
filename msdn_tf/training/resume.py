"""``--resume``, in one place: which flags may change, whether a run dir may be (re)started, and the restore.

* :func:`resume_config`: the config a resumed run continues with (the run's own
  ``config.yaml`` plus the flags that are safe), refusing every other flag;
* :func:`check_run_dir`: before anything is written, whether this run may start here
  (``--resume`` needs a checkpoint; a new run over a checkpoint or a model needs
  ``--resume`` or ``--overwrite``);
* :func:`resume_point`: where a run starts: step 0, or the checkpoint's step, history and
  record of resumes, after checking that the checkpoint lies within ``train.iterations``
  and that the data describe the same problem (:func:`data_problem`);
* :func:`has_checkpoint`: whether a run directory can be resumed (the protocols use it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

from msdn_tf.config import flag_values, from_dict, load_yaml, validate
from msdn_tf.errors import ConfigError, DataError, MSDNError

# files a run directory holds; a new run only replaces them with --overwrite
RUN_FILES = ("model.keras", "results.json", "results.md", "config.yaml", "metadata.json", "class_semantics.json")
RUN_FOLDERS = ("checkpoint", "tensorboard")


def has_checkpoint(run_dir) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume (``checkpoint/state.json``)."""
    return (Path(run_dir) / "checkpoint" / "state.json").is_file()


def resume_config(args) -> tuple:
    """``(config, changes)`` of ``--resume``: the run's own config plus the flags that are safe.

    A resumed run continues what its checkpoint was trained with. Safe to change:
    ``--iterations`` (more steps: the run then equals an uninterrupted run of that
    length, as batches depend only on the step) and ``--data-dir`` (the same data,
    moved; :func:`resume_point` checks that it describes the same problem). Every other
    flag that would change the run is refused, naming it and why. ``changes`` is
    ``{"section.key": (old, new)}``, recorded in the run.
    """
    from msdn_tf.config import canonical_dataset_name

    if not args.run_dir:
        raise ConfigError("--resume needs --run-dir")
    if Path(args.run_dir).exists() and not Path(args.run_dir).is_dir():
        raise MSDNError(f"--run-dir {args.run_dir}: is a file, not a folder")
    path = Path(args.run_dir) / "config.yaml"
    if not path.is_file() and not has_checkpoint(args.run_dir):
        raise MSDNError(f"--resume: no checkpoint in {Path(args.run_dir) / 'checkpoint'}; nothing to resume")
    config = from_dict(load_yaml(path), str(path))
    why = "the checkpoint was trained with the run's own config.yaml; start a new run (another --run-dir) to change it"
    refused = []
    if args.dataset is not None and canonical_dataset_name(args.dataset) != config.data.dataset:
        refused.append(f"--dataset {args.dataset} (the run is {config.data.dataset})")
    if args.seed is not None and args.seed != config.train.seed:
        refused.append(f"--seed {args.seed} (the run's seed is {config.train.seed})")
    if getattr(args, "strategy", None) is not None and args.strategy != config.train.strategy:
        refused.append(f"--strategy {args.strategy} (the run used {config.train.strategy})")
    precision = getattr(args, "precision", None)
    if precision is not None and precision != config.train.precision:
        refused.append(f"--precision {precision} (the run used {config.train.precision})")
    if getattr(args, "overwrite", False):
        refused.append("--overwrite (a resumed run continues its checkpoint; --overwrite starts a new one)")
    refused += [f"--config {c}" for c in args.config] + [f"--set {t}" for t in args.set]
    if refused:
        raise ConfigError(
            f"--resume: refusing {'; '.join(refused)}: {why}. "
            "Only --iterations (more steps) and --data-dir (moved data) can change on resume"
        )
    changes = {}
    if args.iterations is not None and args.iterations != config.train.iterations:
        changes["train.iterations"] = (config.train.iterations, int(args.iterations))
    if args.data_dir is not None and args.data_dir != config.data.data_dir:
        changes["data.data_dir"] = (config.data.data_dir, args.data_dir)
    flag = {"train.iterations": "--iterations", "data.data_dir": "--data-dir"}
    flag_values(config, [(key, new, f"--resume {flag[key]}") for key, (_, new) in changes.items()])
    validate(config)
    return config, changes


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, cluster) -> None:
    """Refuse, before anything is written: ``--resume`` without a checkpoint; a new run over a
    checkpoint or a model without ``--overwrite``.

    ``cluster`` is the :class:`~msdn_tf.distribute.ClusterInfo`: only the chief writes the
    run directory, so only it is refused for an existing run.
    """
    checkpoint = has_checkpoint(run_dir)
    if resume and not checkpoint:
        raise MSDNError(
            f"--resume: no checkpoint in {run_dir / 'checkpoint'}"
            + (
                ""
                if cluster.is_chief
                else f" (worker {cluster.task_type}[{cluster.index}] resumes from the chief's checkpoint: "
                "give every worker the same --run-dir on a shared file system, or copy the "
                "chief's run directory to this path first)"
            )
        )
    if resume or overwrite or not cluster.is_chief:
        return
    if checkpoint:
        raise MSDNError(
            f"{run_dir} already holds a checkpoint; pass --resume to continue it, --overwrite to replace "
            "the run, or choose another --run-dir"
        )
    if (run_dir / "model.keras").exists():
        raise MSDNError(
            f"{run_dir} already holds a model (model.keras); pass --overwrite to replace the run, "
            "or choose another --run-dir"
        )


def data_problem(data) -> dict:
    """What a checkpoint was trained for, to compare on ``--resume``: sizes, classes, split, attributes."""

    def digest(*arrays) -> str:
        h = hashlib.sha256()
        for a in arrays:
            h.update(json.dumps(a).encode())
        return h.hexdigest()[:16]

    return {
        "classes": int(data.num_classes),
        "attributes": int(data.num_attributes),
        "regions": int(data.num_regions),
        "channels": int(data.feature_dim),
        "seen_classes": [int(c) for c in data.seen_classes],
        "unseen_classes": [int(c) for c in data.unseen_classes],
        "class_names": digest(list(data.class_names)),
        "attribute_names": digest(list(data.attribute_names)),
        "att": digest([round(float(v), 5) for v in data.att.reshape(-1)]),
    }


def _compare_problem(saved: dict, now: dict, where: str) -> None:
    differ = []
    for key, value in saved.items():
        if key in now and now[key] != value:
            if key in ("seen_classes", "unseen_classes"):
                added = sorted(set(now[key]) - set(value))
                gone = sorted(set(value) - set(now[key]))
                differ.append(f"{key.replace('_', ' ')} (now also {added[:8]}, no longer {gone[:8]})")
            elif isinstance(value, int):
                differ.append(f"{key} ({value} in the checkpoint, {now[key]} now)")
            else:
                differ.append(key.replace("_", " ").replace("att", "class attributes"))
    if differ:
        raise DataError(
            f"--resume: the data do not describe the problem the checkpoint {where} was trained on: "
            f"{'; '.join(differ)} differ. Resume with the run's own data (--data-dir only for the same "
            "files, moved), or start a new run"
        )


@dataclasses.dataclass
class ResumePoint:
    """Where a session starts: ``step`` 0 with an empty history, or a checkpoint's."""

    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    resumes: list = dataclasses.field(default_factory=list)
    state: Optional[dict] = None  # the checkpoint's state.json when resuming


def resume_point(checkpointer, resume: bool, iterations: int, data, resume_changes=None) -> ResumePoint:
    """The point a session starts from; on ``--resume`` the checkpoint's, checked.

    Refuses a checkpoint past ``iterations`` (the one place this is checked) and data that
    describe another problem than the checkpoint's (classes, seen/unseen split,
    attributes, feature shapes); a checkpoint written before the problem was recorded is
    not compared. Reads only: nothing is written.
    """
    if not resume:
        return ResumePoint()
    state = checkpointer.read_state()
    step = int(state["step"])
    if step > iterations:
        raise ConfigError(
            f"--resume: the checkpoint is at step {step}, past train.iterations = {iterations}; "
            f"pass --iterations {step} or more"
        )
    if isinstance(state.get("problem"), dict):
        _compare_problem(state["problem"], data_problem(data), str(checkpointer.state_path))
    resumes = list(state.get("resumes", []))
    if resume_changes:
        resumes.append({"step": step, "changes": resume_changes})
    return ResumePoint(step=step, history=list(state["history"]), resumes=resumes, state=state)
