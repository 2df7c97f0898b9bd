"""The dataset table: every dataset is one entry here, served by one training path.

An entry names the files a dataset needs, how to load them into a
:class:`~msdn_tf.data.base.ZSLData`, and the sizes the loaded data must have.
Add your own dataset with :func:`register_dataset`.

The three benchmarks (CUB, SUN, AWA2) load from either of two folder layouts
(docs/data.md):

(a) the reference feature-map HDF5 ``feature_map_ResNet_101_{CUB,SUN,AWA2}.hdf5``
    (docs/reference.md §1.1; features, labels, splits, ``att`` and ``w2v_att`` in one
    file). Class and attribute names come from ``att_splits.mat`` and the
    attribute-name file in the same folder (or its ``CUB/``... sub-folder) when present;
(b) the xlsa17 metadata (``att_splits.mat``, ``res101.mat`` or ``image_list.npz``,
    ``{DS}_attribute.pkl``, attribute names) plus a feature file made by
    ``python -m msdn_tf.extract`` (``data.feature_file``, default
    ``features_resnet101_448.hdf5``), one row per image of the image list.

With ``data.cache: true`` the features are read from a prepared channel-last
float16 cache (:mod:`msdn_tf.data.cache`), built on first use.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from msdn_tf.data import custom as custom_data
from msdn_tf.data.base import ZSLData, check_data_dir
from msdn_tf.data.cache import use_cache
from msdn_tf.data.datasets import BENCHMARKS
from msdn_tf.errors import DataError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One row of the dataset table.

    Attributes:
        name: the ``--dataset`` name.
        description: one line for ``--help`` and errors.
        loader: ``loader(config, spec) -> ZSLData``.
        required_files: files (relative to ``data.data_dir``) to name when they are missing.
        nonnegative_att: clip negative class attributes before normalising (docs/reference.md §1.4).
        expected: sizes the loaded data must have (keys of ``ZSLData.summary()``).
        upstream_name: file-name stem used by the standard files (``CUB``, ``SUN``, ``AWA2``).
        alternative_files: the files of the second layout (xlsa17 + extracted features);
            ``{feature_file}`` stands for ``data.feature_file``.
    """

    name: str
    description: str
    loader: Callable
    required_files: Tuple[str, ...] = ()
    nonnegative_att: bool = False
    expected: Dict[str, int] = dataclasses.field(default_factory=dict)
    upstream_name: Optional[str] = None
    alternative_files: Tuple[str, ...] = ()


DATASETS: Dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, overwrite: bool = False) -> DatasetSpec:
    """Add a dataset to the table.

    Names are case-insensitive (``--dataset CUB`` is ``cub``), so a name must be lower case.
    """
    if spec.name != spec.name.lower():
        raise ValueError(f"dataset names are case-insensitive and written in lower case; got {spec.name!r}")
    if spec.name in DATASETS and not overwrite:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


def get_spec(name: str) -> DatasetSpec:
    """The table entry of a dataset name (case-insensitive)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


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

    if config.data.data_dir:
        check_data_dir(config.data.data_dir)
    path = ensure_demo_file(config.demo, config.data.data_dir)
    data = load_feature_map_hdf5(path, name="demo")
    return use_cache(data, path, config)


def _candidate_dirs(folder: Path, spec: DatasetSpec) -> list:
    """``DIR`` itself, then ``DIR/CUB`` (and the lower-case name) for a folder of several datasets."""
    out = [folder]
    for sub in (spec.upstream_name, spec.name):
        if sub and (folder / sub).is_dir() and folder / sub not in out:
            out.append(folder / sub)
    return out


def _find(dirs, name: str) -> Optional[Path]:
    if os.path.isabs(name):
        return Path(name) if Path(name).is_file() else None
    for d in dirs:
        if (d / name).is_file():
            return d / name
    return None


def _layout_report(spec: DatasetSpec, config, dirs) -> str:
    """The files of both layouts, each marked found or missing."""

    def line(name):
        where = _find(dirs, name)
        return f"    {name}  [{'found: ' + str(where) if where else 'missing'}]"

    from msdn_tf.data import xlsa17

    ds = spec.upstream_name or spec.name.upper()
    pkl = f"{ds}_attribute.pkl"
    image_lists = ("image_list.npz", "res101.mat")
    names = [n for n in xlsa17.ATTRIBUTE_NAME_FILES]
    img_found = [n for n in image_lists if _find(dirs, n)]
    name_found = [n for n in names if _find(dirs, n)]
    return "\n".join(
        [
            "  (a) the reference feature-map file (TransZero format):",
            line(spec.required_files[0]),
            "  (b) xlsa17 metadata plus features made by `python -m msdn_tf.extract`:",
            line("att_splits.mat"),
            f"    res101.mat or image_list.npz  [{'found: ' + img_found[0] if img_found else 'missing'}]",
            line(pkl),
            f"    attribute names ({' / '.join(names)}; optional)  "
            f"[{'found: ' + name_found[0] if name_found else 'missing'}]",
            line(config.data.feature_file) + "   (data.feature_file)",
            "  (see docs/data.md for where to get each file)",
        ]
    )


def _names_from_xlsa17(dirs) -> tuple:
    """Class names (att_splits.mat) and attribute names (attribute-name file) beside a layout-(a) file."""
    from msdn_tf.data import xlsa17

    class_names = attribute_names = None
    splits_path = _find(dirs, "att_splits.mat")
    if splits_path is not None:
        splits = xlsa17.load_att_splits(str(splits_path))
        class_names = splits["allclasses_names"]
    for name in xlsa17.ATTRIBUTE_NAME_FILES:
        path = _find(dirs, name)
        if path is not None:
            attribute_names = xlsa17.load_attribute_names(str(path))
            break
    return class_names, attribute_names, splits_path


def _load_benchmark(config, spec) -> ZSLData:
    from msdn_tf.data import xlsa17
    from msdn_tf.data.hdf5 import HDF5Features, load_feature_map_hdf5

    data_dir = config.data.data_dir
    needed = "\n  ".join(spec.required_files)
    alternatives = ", ".join(a.format(feature_file=config.data.feature_file) for a in spec.alternative_files)
    if not data_dir:
        raise DataError(
            f"--dataset {spec.name} needs --data-dir DIR holding either\n  {needed}\n"
            f"or the xlsa17 files {alternatives}\n(see docs/data.md)"
        )
    folder = check_data_dir(data_dir)
    if not folder.is_dir():
        raise DataError(
            f"data directory {folder} does not exist; it should hold:\n  {needed}\n"
            "or the xlsa17 layout (see docs/data.md)"
        )
    dirs = _candidate_dirs(folder, spec)

    # (a) the reference feature-map HDF5
    reference = _find(dirs, spec.required_files[0])
    if reference is not None:
        class_names, attribute_names, splits_path = _names_from_xlsa17(dirs)
        data = load_feature_map_hdf5(
            reference,
            name=spec.name,
            nonnegative_att=spec.nonnegative_att,
            class_names=class_names,
            attribute_names=attribute_names,
        )
        # names stored in the HDF5 win; names from the folder must at least agree in number
        if class_names is not None and len(class_names) != data.num_classes:
            raise DataError(
                f"{splits_path}: {len(class_names)} class names but {reference} has {data.num_classes} classes"
            )
        return use_cache(data, reference, config)

    # (b) xlsa17 metadata + extracted features
    feature_path = _find(dirs, config.data.feature_file)
    splits_path = _find(dirs, "att_splits.mat")
    if feature_path is not None and splits_path is not None:
        if str(feature_path).lower().endswith(".npy"):
            from msdn_tf.data.cache import MemmapFeatures

            features = MemmapFeatures(str(feature_path))
        else:
            features = HDF5Features(str(feature_path))
        data = xlsa17.load_xlsa17_dataset(str(splits_path.parent), spec.name, features)
        return use_cache(data, feature_path, config)

    raise DataError(
        f"{folder / spec.required_files[0]}: not found, and the xlsa17 layout is incomplete; "
        f"--dataset {spec.name} needs in {folder} (or {folder / (spec.upstream_name or spec.name)}) EITHER\n"
        + _layout_report(spec, config, dirs)
    )


register_dataset(
    DatasetSpec(
        name="demo",
        description="built-in synthetic dataset (generated on first use, no download)",
        loader=_load_demo,
    )
)


def _benchmark_spec(facts) -> DatasetSpec:
    """The table entry of a benchmark, from its facts in :data:`msdn_tf.data.datasets.BENCHMARKS`."""
    stem = facts.folder
    return DatasetSpec(
        name=facts.name,
        description=f"{stem} zero-shot benchmark (xlsa17 proposed split)",
        loader=_load_benchmark,
        required_files=(f"feature_map_ResNet_101_{stem}.hdf5",),
        nonnegative_att=facts.nonnegative_att,
        expected=facts.expected(),
        upstream_name=stem,
        alternative_files=(
            "att_splits.mat",
            "res101.mat or image_list.npz",
            f"{stem}_attribute.pkl",
            "attribute names (optional)",
            "{feature_file}",
        ),
    )


for _facts in BENCHMARKS.values():
    register_dataset(_benchmark_spec(_facts))


def _load_custom(config, spec) -> ZSLData:
    return custom_data.load_custom_dataset(config.data.data_dir, config)


register_dataset(
    DatasetSpec(
        name="custom",
        description="your own attribute-annotated images, prepared by python -m msdn_tf.custom prepare",
        loader=_load_custom,
        required_files=(custom_data.FEATURE_FILE, custom_data.MANIFEST_FILE),
    )
)
