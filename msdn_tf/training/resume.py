"""``--resume``: which flags a resumed run may change, and the config it continues with."""

from __future__ import annotations

from pathlib import Path

from msdn_tf.config import from_dict, load_yaml
from msdn_tf.errors import ConfigError, MSDNError


def resume_config(args) -> tuple:
    """``(config, changes)`` of ``--resume``: the run's own config plus the flags that are safe.

    A resumed run continues what its checkpoint was trained with. Safe to change:
    ``--iterations`` (more steps: the run then equals an uninterrupted run of that
    length, as batches depend only on the step) and ``--data-dir`` (the same data,
    moved; the dataset's size checks still apply). Every other flag that would
    change the run is refused, naming it and why. ``changes`` is
    ``{"section.key": (old, new)}``, recorded in the run.
    """
    from msdn_tf.config import canonical_dataset_name

    if not args.run_dir:
        raise ConfigError("--resume needs --run-dir")
    path = Path(args.run_dir) / "config.yaml"
    if Path(args.run_dir).exists() and not Path(args.run_dir).is_dir():
        raise MSDNError(f"--run-dir {args.run_dir}: is a file, not a folder")
    config = from_dict(load_yaml(path), str(path))
    why = "the checkpoint was trained with the run's own config.yaml; start a new run (another --run-dir) to change it"
    refused = []
    if args.dataset is not None and canonical_dataset_name(args.dataset) != config.data.dataset:
        refused.append(f"--dataset {args.dataset} (the run is {config.data.dataset})")
    if args.seed is not None and args.seed != config.train.seed:
        refused.append(f"--seed {args.seed} (the run's seed is {config.train.seed})")
    if args.strategy is not None and args.strategy != config.train.strategy:
        refused.append(f"--strategy {args.strategy} (the run used {config.train.strategy})")
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
    if changes:
        overrides = [f"{key}={new}" for key, (_, new) in changes.items()]
        from msdn_tf.config import merge, parse_override, validate

        for text in overrides:
            merge(config, parse_override(text), f"--resume {text}")
        validate(config)
    return config, changes
