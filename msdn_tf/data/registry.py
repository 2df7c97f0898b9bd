"""The dataset table: every dataset is one entry here, served by one training path.

An entry names the files a dataset needs, how to load them into a
:class:`~msdn_tf.data.base.ZSLData`, and the sizes the loaded data must have.
Add your own dataset with :func:`register_dataset`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from msdn_tf.data.base import ZSLData
from msdn_tf.errors import DataError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One row of the dataset table.

    Attributes:
        name: the ``--dataset`` name.
        description: one line for ``--help`` and errors.
        loader: ``loader(config, spec) -> ZSLData``.
        required_files: files (relative to ``data.data_dir``) to name when they are missing.
        nonnegative_att: clip negative class attributes before normalising (reference §1.4).
        expected: sizes the loaded data must have (keys of ``ZSLData.summary()``).
        upstream_name: file-name stem used by the standard files (``CUB``, ``SUN``, ``AWA2``).
    """

    name: str
    description: str
    loader: Callable
    required_files: Tuple[str, ...] = ()
    nonnegative_att: bool = False
    expected: Dict[str, int] = dataclasses.field(default_factory=dict)
    upstream_name: Optional[str] = None


DATASETS: Dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, overwrite: bool = False) -> DatasetSpec:
    """Add a dataset to the table."""
    if spec.name in DATASETS and not overwrite:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def load_dataset(config) -> ZSLData:
    """Load the dataset that ``config.data.dataset`` names, checking the table's expected sizes."""
    spec = get_spec(config.data.dataset)
    data = spec.loader(config, spec)
    summary = data.summary()
    for key, value in spec.expected.items():
        if summary.get(key) != value:
            raise DataError(
                f"{data.source}: {spec.name} should have {key} = {value}, the files give {summary.get(key)}"
            )
    return data


# --------------------------------------------------------------------------- loaders
def _load_demo(config, spec) -> ZSLData:
    from msdn_tf.data.demo import ensure_demo_file
    from msdn_tf.data.hdf5 import load_feature_map_hdf5

    path = ensure_demo_file(config.demo, config.data.data_dir)
    return load_feature_map_hdf5(path, name="demo")


def _load_benchmark(config, spec) -> ZSLData:
    from msdn_tf.data.hdf5 import load_feature_map_hdf5

    data_dir = config.data.data_dir
    needed = "\n  ".join(spec.required_files)
    if not data_dir:
        raise DataError(
            f"--dataset {spec.name} needs --data-dir DIR holding:\n  {needed}\n"
            "(see README, 'Benchmark data')"
        )
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"data directory {folder} does not exist; it should hold:\n  {needed}")
    feature_file = folder / spec.required_files[0]
    if not feature_file.is_file():
        raise DataError(f"{feature_file}: not found; --dataset {spec.name} needs in {folder}:\n  {needed}")
    return load_feature_map_hdf5(feature_file, name=spec.name, nonnegative_att=spec.nonnegative_att)


register_dataset(DatasetSpec(
    name="demo",
    description="built-in synthetic dataset (generated on first use, no download)",
    loader=_load_demo,
))

_BENCHMARKS = {
    # name: (upstream stem, nonnegative att, images, K, C, seen, unseen, trainval, test_seen, test_unseen)
    "cub": ("CUB", False, 11788, 312, 200, 150, 50, 7057, 1764, 2967),
    "sun": ("SUN", False, 14340, 102, 717, 645, 72, 10320, 2580, 1440),
    "awa2": ("AWA2", True, 37322, 85, 50, 40, 10, 23527, 5882, 7913),
}

for _name, (_stem, _nonneg, _n, _k, _c, _s, _u, _tv, _ts, _tu) in _BENCHMARKS.items():
    register_dataset(DatasetSpec(
        name=_name,
        description=f"{_stem} zero-shot benchmark (xlsa17 proposed split)",
        loader=_load_benchmark,
        required_files=(f"feature_map_ResNet_101_{_stem}.hdf5",),
        nonnegative_att=_nonneg,
        expected={"images": _n, "attributes": _k, "classes": _c, "seen_classes": _s,
                  "unseen_classes": _u, "trainval": _tv, "test_seen": _ts, "test_unseen": _tu},
        upstream_name=_stem,
    ))
