"""Typed configuration: dataclasses with defaults, YAML files of overrides, command-line overrides.

Resolution order (later wins):

1. the dataclass defaults below;
2. ``configs/<dataset>.yaml`` (the dataset's reference hyper-parameters);
3. ``--config FILE`` (any number of YAML files);
4. ``--set section.key=value`` overrides (values parsed as YAML);
5. the command's own flags (``--data-dir``, ``--seed``, ...), set as the typed values the
   user gave (:func:`flag_values`): a path is never re-read as YAML text, so
   ``--data-dir "runs/dd #2"`` and ``--data-dir null`` are those folders.

Unknown sections or keys and values of the wrong type raise :class:`ConfigError`
naming the file (or override) and the key. The resolved config is written to
``config.yaml`` in every run directory, and a run can be repeated from it with
``--config <run>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any, List, Optional

import yaml

from msdn_tf.errors import ConfigError
from msdn_tf.limits import load_yaml_file, load_yaml_text, short_repr, short_text
from msdn_tf.options import CONFIG_CHOICES

# The recipes ship inside the package (msdn_tf/configs, a link to the top-level configs/ in a
# checkout, real files in a wheel), so an installed msdn-tf reads them from any folder.
CONFIG_DIR = Path(os.environ.get("MSDN_CONFIG_DIR", Path(__file__).resolve().parent / "configs"))

# Datasets whose recipe (configs/<name>.yaml) is part of msdn-tf: without it a run would silently
# use the dataclass defaults (e.g. SUN with lambda_cal 0.1 instead of 0.0001), so its absence is
# an error. Datasets you register yourself may have a recipe or not.
RECIPE_DATASETS = ("demo", "cub", "sun", "awa2", "custom")


@dataclasses.dataclass
class DataConfig:
    """Where the data comes from and how batches are drawn.

    Attributes:
        dataset: a name in the dataset table (``msdn_tf.data.registry``).
        data_dir: folder with the dataset's files (see the README for each layout).
        sampler: ``random`` (uniform batches, reference CUB), ``class_balanced``
            (distinct seen classes, reference SUN/AWA2) or ``epoch`` (shuffled epochs).
        batch_size: training batch size.
        eval_batch_size: evaluation batch size (100 in the reference).
        prefetch: batches prepared ahead by tf.data.
        feature_file: feature file of the xlsa17 layout (made by ``msdn_tf.extract``),
            relative to ``data_dir`` (or absolute); see docs/data.md.
        cache: read features from a prepared channel-last float16 cache
            (``python -m msdn_tf.prepare``), building it on first use when absent or stale.
        cache_dir: folder of the cache; default: the feature file's folder.
        cache_dtype: ``float16`` (half the size) or ``float32``.
        on_device: hold the training rows in TensorFlow memory and gather batches in
            the graph (``msdn_tf.data.device``): ``true``, ``false`` or ``auto`` (when
            they fit half the available memory, at most 8 GiB). TensorFlow backend
            only; on JAX batches always come from the host pipeline.
    """

    dataset: str = "demo"
    data_dir: Optional[str] = None
    sampler: str = "random"
    batch_size: int = 50
    eval_batch_size: int = 100
    prefetch: int = 2
    feature_file: str = "features_resnet101_448.hdf5"
    cache: bool = False
    cache_dir: Optional[str] = None
    cache_dtype: str = "float16"
    on_device: Any = "auto"


@dataclasses.dataclass
class DemoConfig:
    """Size of the built-in synthetic dataset (``msdn_tf.data.demo``)."""

    num_classes: int = 40
    num_unseen: int = 10
    num_attributes: int = 24
    attributes_per_class: int = 6
    images_per_class: int = 60
    map_size: int = 7
    feature_dim: int = 256
    embed_dim: int = 300
    test_seen_fraction: float = 0.2
    distractors: float = 0.3
    seed: int = 0


@dataclasses.dataclass
class ModelConfig:
    """Architecture and test-time fusion (docs/reference.md §2, §3, §6)."""

    normalize_attribute_vectors: bool = False
    fusion_weights: List[float] = dataclasses.field(default_factory=lambda: [0.9, 0.1])
    branches: str = "both"
    attention: str = "softmax"
    bias: float = 1.0  # the margin: +bias unseen, -bias seen logits (docs/reference.md §2, §4, §7)


@dataclasses.dataclass
class LossConfig:
    """Loss weights and forms (docs/reference.md §4; paper Eqs. 7-8)."""

    lambda_cal: float = 0.1
    distill_weight: float = 0.001
    cross_entropy: str = "all"
    calibration: str = "batch_mass"
    distillation: str = "reference"


@dataclasses.dataclass
class OptimizerConfig:
    """torch-style RMSprop (docs/reference.md §5)."""

    learning_rate: float = 1e-4
    rho: float = 0.99
    epsilon: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 1e-4


@dataclasses.dataclass
class TrainConfig:
    """Schedule, logging and run directory.

    Attributes:
        seed: global seed (sampler, initialisation).
        iterations: training steps; ``None`` means ``trainval * epochs // batch_size``.
        epochs: used only when ``iterations`` is ``None``.
        eval_every: steps between evaluations; ``None`` means ``trainval // batch_size``.
        eval_offset: the first evaluation comes after step ``eval_offset`` (0: after
            ``eval_every``), then one every ``eval_every`` steps, and always one after the
            last step. The reference scripts evaluate after the step of every iteration
            ``i`` with ``i % eval_every == 0`` (0-based): after steps 1, 1 + e, 1 + 2e, ...;
            ``configs/{cub,sun,awa2}.yaml`` set 1 to evaluate at exactly those steps
            (docs/reference.md §6), plus the last step for the ``final`` protocol.
        log_every: steps between TensorBoard loss scalars.
        jit_compile: compile the train/eval steps with XLA (TensorFlow backend; on
            JAX every step is ``jax.jit``-compiled whatever this says).
        deterministic: enable TensorFlow's deterministic ops.
        strategy: ``none``, ``mirrored`` (all local GPUs, or all logical CPU devices)
            or ``multi_worker`` (cluster from ``TF_CONFIG``); see ``msdn_tf.distribute``.
            TensorFlow backend only: on JAX anything but ``none`` is an error.
        precision: ``float32`` (reference numerics), ``mixed_bfloat16``, ``mixed_float16``
            (with loss scaling) or ``auto`` (bfloat16 where the hardware runs it natively,
            else float32); see ``msdn_tf.precision``. A run's saved config holds the
            precision actually used (``auto`` resolved).
        worker_timeout: ``multi_worker`` only: seconds to wait for every worker of
            ``TF_CONFIG`` to connect and the deadline of every all-reduce (a worker
            that stops later is noticed within it); see docs/distributed.md.
        eval_initial: evaluate the untrained model (step 0) as well.
        tensorboard_images: after each evaluation also write attention images, the
            seen/unseen confusion and per-class accuracy histograms (``msdn_tf.viz.tensorboard``).
        tensorboard_examples: test images shown in those attention images.
        out_dir: parent of run directories.
        run_name: run directory name; default ``<dataset>-<seed>-<time>``.
        verbose: Keras progress display: 0 silent, 1 progress bar, 2 one line per period,
            ``-1`` chooses 1 on a terminal and 2 otherwise.
        check_numerics: stop at the first training step whose input features,
            gradients or updated weights hold a NaN or inf, naming the step and what
            went non-finite (docs/reliability.md; its cost is measured there). The loss
            terms and the evaluation outputs are checked either way.
    """

    seed: int = 214
    iterations: Optional[int] = None
    epochs: int = 30
    eval_every: Optional[int] = None
    eval_offset: int = 0
    log_every: int = 20
    jit_compile: bool = False
    deterministic: bool = True
    strategy: str = "none"
    precision: str = "float32"
    worker_timeout: float = 120.0
    eval_initial: bool = True
    tensorboard_images: bool = False
    tensorboard_examples: int = 4
    out_dir: str = "runs"
    run_name: Optional[str] = None
    verbose: int = -1
    check_numerics: bool = True


@dataclasses.dataclass
class Config:
    """The whole configuration of a run."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- merging
def _coerce(value: Any, annotation, where: str):
    """Check (and gently convert) ``value`` against a dataclass field type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        return [_coerce(v, args[0] if args else Any, where) for v in value]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {short_repr(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {short_repr(value)}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {short_repr(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {short_repr(value)}")
    return value


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def merge(config: Config, updates: dict, source: str) -> Config:
    """Apply a nested dict of overrides to ``config`` in place; unknown keys raise.

    Args:
        config: the config to update.
        updates: ``{section: {key: value}}``.
        source: file name or ``--set`` text, used in error messages.
    """
    if updates is None:
        return config
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(updates).__name__}")
    sections = _field_types(Config)
    for section, values in updates.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {short_repr(section)}; known sections: {', '.join(sections)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{short_text(section)}' must be a mapping, got {short_repr(values)}")
        target = getattr(config, section)
        types = _field_types(type(target))
        for key, value in values.items():
            if key not in types:
                raise ConfigError(
                    f"{source}: unknown key '{section}.{short_text(key)}'; known keys: {', '.join(types)}"
                )
            setattr(target, key, _coerce(value, types[key], f"{source}: '{section}.{key}'"))
            sources_of(config)[(section, key)] = source
    return config


def sources_of(config: Config) -> dict:
    """``{(section, key): source}``: the file or ``--set`` text that last set each value.

    Kept beside the dataclass fields (not one of them), so it is neither saved nor compared.
    """
    sources = config.__dict__.get("_sources")
    if sources is None:
        sources = {}
        object.__setattr__(config, "_sources", sources)
    return sources


def value_source(config: Config, section: str, key: str) -> str:
    """Where ``section.key`` came from, for error messages (``the default`` when nothing set it)."""
    return sources_of(config).get((section, key), "the default")


def load_yaml(path) -> dict:
    """Read a YAML file of overrides; a clear error names the file if it is missing or malformed.

    The file is read within the budgets of :mod:`msdn_tf.limits` (at most 1 MiB of UTF-8,
    nesting, alias expansion and scalar size checked before anything is built), and a
    key given twice (a whole section included) is an error naming both lines.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    content = load_yaml_file(path, "config file", ConfigError)
    return content or {}


def parse_override(text: str) -> dict:
    """``"train.iterations=100"`` -> ``{"train": {"iterations": 100}}`` (value parsed as YAML)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {short_repr(text)}: expected section.key=value, e.g. train.iterations=100")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    value = load_yaml_text(raw, f"--set {short_text(text)}", ConfigError)
    return {section: {name: value}}


def flag_values(config: Config, flags) -> Config:
    """Set command flags on ``config`` as typed values (never parsed as YAML); unknown keys raise.

    Args:
        config: the config to update (in place).
        flags: ``(section.key, value, flag)`` triples, e.g. ``("data.data_dir", args.data_dir,
            "--data-dir")``; a ``None`` value is skipped (the flag was not given). ``flag``
            names the value's source in error messages.

    Example:
        >>> c = flag_values(Config(), [("data.data_dir", "runs/dd #2", "--data-dir")])
        >>> c.data.data_dir
        'runs/dd #2'
    """
    for key, value, flag in flags:
        if value is None:
            continue
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{flag}: empty value; give a value or leave the flag out")
        section, name = key.split(".", 1)
        merge(config, {section: {name: value}}, f"{flag} {value}")
    return config


def dataset_config_path(dataset: str) -> Path:
    return CONFIG_DIR / f"{dataset}.yaml"


def resolve_config(
    dataset: Optional[str] = None, config_files=(), overrides=(), use_dataset_file=True, flags=()
) -> Config:
    """Build the resolved config of a run.

    Args:
        dataset: dataset name; its recipe ``configs/<dataset>.yaml`` is applied (required for the
            built-in datasets, :data:`RECIPE_DATASETS`; optional for datasets you registered).
        config_files: extra YAML files, applied in order.
        overrides: ``section.key=value`` strings (``--set``; the value is YAML).
        use_dataset_file: apply ``configs/<dataset>.yaml``.
        flags: ``(section.key, value, flag)`` triples of a command's own flags, applied
            last as typed values (:func:`flag_values`).

    Returns:
        A validated :class:`Config`.

    Raises:
        ConfigError: a built-in dataset's recipe is missing, or a file or override is invalid.
    """
    config = Config()
    if dataset is not None:
        dataset = canonical_dataset_name(dataset)
        config.data.dataset = dataset
        sources_of(config)[("data", "dataset")] = f"--dataset {dataset}"
        path = dataset_config_path(dataset)
        if use_dataset_file and path.is_file():
            merge(config, load_yaml(path), str(path))
        elif use_dataset_file and dataset in RECIPE_DATASETS:
            raise ConfigError(
                f"{path}: the recipe of --dataset {dataset} is missing (the msdn-tf installation is "
                f"incomplete: reinstall it, or point MSDN_CONFIG_DIR at a folder with {dataset}.yaml)"
            )
    for path in config_files:
        merge(config, load_yaml(path), str(path))
    if dataset is not None:
        config.data.dataset = dataset  # the explicit --dataset wins over files
        sources_of(config)[("data", "dataset")] = f"--dataset {dataset}"
    for text in overrides:
        merge(config, parse_override(text), f"--set {short_text(text)}")
    flag_values(config, flags)
    validate(config)
    return config


def canonical_dataset_name(name):
    """Dataset names are case-insensitive: ``CUB``, ``cub`` and ``Cub`` all mean ``cub``.

    The upstream files spell them in capitals (``feature_map_ResNet_101_CUB.hdf5``), so
    users type both; the dataset table and ``configs/`` use lower case.
    """
    return name.lower() if isinstance(name, str) else name


# the seeds numpy, Keras and TensorFlow all accept
SEED_RANGE = (0, 2**32 - 1, True, True)
# |bias| above this swamps the class scores (logits are att . scores, att rows of unit norm):
# every image becomes an unseen (or, negative, a seen) class whatever it shows
MAX_BIAS = 100.0

# (section, key): (lowest, highest, lowest allowed?, highest allowed?), for numbers; None: unbounded
RANGES = {
    ("data", "batch_size"): (1, None, True, True),
    ("data", "eval_batch_size"): (1, None, True, True),
    ("data", "prefetch"): (0, None, True, True),
    ("demo", "num_classes"): (2, None, True, True),
    ("demo", "num_unseen"): (1, None, True, True),
    ("demo", "num_attributes"): (1, None, True, True),
    ("demo", "attributes_per_class"): (1, None, True, True),
    ("demo", "images_per_class"): (2, None, True, True),
    ("demo", "map_size"): (3, None, True, True),  # the object box is 3-4 regions wide
    ("demo", "feature_dim"): (4, None, True, True),  # each attribute pattern uses >= 4 channels
    ("demo", "embed_dim"): (1, None, True, True),
    ("demo", "test_seen_fraction"): (0.0, 1.0, False, False),
    ("demo", "distractors"): (0.0, None, True, True),
    ("loss", "lambda_cal"): (0.0, None, True, True),
    ("loss", "distill_weight"): (0.0, None, True, True),
    ("optimizer", "learning_rate"): (0.0, None, False, True),
    ("optimizer", "rho"): (0.0, 1.0, False, False),
    ("optimizer", "epsilon"): (0.0, None, False, True),
    ("optimizer", "momentum"): (0.0, 1.0, True, False),
    ("optimizer", "weight_decay"): (0.0, None, True, True),
    ("train", "iterations"): (1, None, True, True),
    ("train", "eval_every"): (1, None, True, True),
    ("train", "eval_offset"): (0, None, True, True),
    ("train", "epochs"): (1, None, True, True),
    ("train", "log_every"): (1, None, True, True),
    ("train", "tensorboard_examples"): (0, None, True, True),
    ("train", "worker_timeout"): (0.0, None, False, True),
    ("train", "seed"): SEED_RANGE,
    ("demo", "seed"): SEED_RANGE,
    ("model", "bias"): (-MAX_BIAS, MAX_BIAS, True, True),
}


def _interval(lo, hi, lo_in, hi_in) -> str:
    if hi is None:
        return f">= {lo}" if lo_in else f"> {lo}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def validate(config: Config) -> None:
    """Value checks that types alone do not catch; each error names where the value came from.

    Every number must be finite; the numbers of :data:`RANGES` must lie in their range
    (e.g. a positive learning rate, ``rho`` in (0, 1), batch sizes of at least 1); choices
    must be among :data:`msdn_tf.options.CONFIG_CHOICES`. This runs before TensorFlow starts.
    """
    config.data.dataset = canonical_dataset_name(config.data.dataset)

    def fail(section, key, text):
        raise ConfigError(f"{value_source(config, section, key)}: '{section}.{key}' {text}")

    for section, types in _field_types(Config).items():
        target = getattr(config, section)
        for key in _field_types(types):
            value = getattr(target, key)
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    fail(section, key, f"must be a finite number, got {short_repr(value)}")
    for (section, key), choices in CONFIG_CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in choices:
            fail(section, key, f"must be one of {', '.join(map(str, choices))}; got {short_repr(value)}")
    if len(config.model.fusion_weights) != 2:
        fail("model", "fusion_weights", f"must be [w1, w2], got {short_repr(config.model.fusion_weights)}")
    weights = config.model.fusion_weights
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        fail(
            "model",
            "fusion_weights",
            f"must be two weights >= 0, at least one > 0 (the reference uses [0.9, 0.1]), got {short_repr(weights)}: "
            "with these the fused scores are zero or inverted and every prediction is meaningless",
        )
    for (section, key), (lo, hi, lo_in, hi_in) in RANGES.items():
        value = getattr(getattr(config, section), key)
        if value is None:
            continue  # iterations/eval_every: null means "from the epochs"
        ok = (value >= lo if lo_in else value > lo) and (hi is None or (value <= hi if hi_in else value < hi))
        if not ok:
            fail(section, key, f"must be {_interval(lo, hi, lo_in, hi_in)}, got {short_repr(value)}")
    _validate_demo(config, fail)


def _validate_demo(config: Config, fail) -> None:
    """The demo generator's sizes that only make sense together."""
    demo = config.demo
    if demo.num_unseen >= demo.num_classes:
        fail(
            "demo",
            "num_unseen",
            f"must be below demo.num_classes = {demo.num_classes} (seen classes are needed), got {demo.num_unseen}",
        )
    if round(demo.test_seen_fraction * demo.images_per_class) >= demo.images_per_class:
        fail(
            "demo",
            "test_seen_fraction",
            f"leaves no training image of a seen class with demo.images_per_class = {demo.images_per_class} "
            f"(got {demo.test_seen_fraction}); lower it or raise demo.images_per_class",
        )
    if demo.attributes_per_class > demo.num_attributes:
        fail(
            "demo",
            "attributes_per_class",
            f"must be at most demo.num_attributes = {demo.num_attributes}, got {demo.attributes_per_class}",
        )


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def from_dict(content: dict, source: str = "<dict>") -> Config:
    config = merge(Config(), content, source)
    validate(config)
    return config


def save_config(config: Config, path) -> None:
    """Write the resolved config as YAML atomically."""
    from msdn_tf.utils import atomic_write_text

    atomic_write_text(path, to_yaml(config))
