"""A tensorflow-datasets builder over the manual files: ``tfds.load("msdn_zsl/cub", ...)``.

Importing this module registers the builder ``msdn_zsl`` with configs ``demo``,
``cub``, ``sun`` and ``awa2``. Nothing is downloaded: ``manual_dir`` is the folder
that ``python -m msdn_tf.train --data-dir`` takes (either layout of docs/data.md;
for ``demo``, a folder holding one ``demo_*.hdf5`` made by
:func:`msdn_tf.data.demo.ensure_demo_file`, generated with the default
:class:`~msdn_tf.config.DemoConfig` when there is none)::

    import tensorflow_datasets as tfds
    import msdn_tf.data.tfds_builder  # registers "msdn_zsl"

    splits, info = tfds.load(
        "msdn_zsl/cub", data_dir="~/tensorflow_datasets", with_info=True,
        download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(manual_dir="DIR")})
    ds = splits["trainval"]          # {"feature_map": (R, F) float16, "label": int64, "image_file": str}
    info.metadata["class_names"]     # plus seen_classes, unseen_classes, att, w2v, ...

Splits: ``trainval``, ``test_seen``, ``test_unseen``, and ``train``/``val`` when the
metadata has them. Examples are the feature maps of one image, channel-last
``(R, F)``, every region L2-normalised (the model normalises again, so this is
lossless up to the float16 rounding, at most 2**-12 per value), in the order of
the split. ``metadata`` holds the class structure as the model uses it: ``att``
(C, K) rows normalised (§1.4), ``w2v`` (K, D), names, seen/unseen ids.

The TFDS copy suits tf.data users and sequential passes (evaluation, exporting
features to other tools). Training msdn-tf itself reads the prepared ``.npy``
cache instead (:mod:`msdn_tf.data.cache`): the reference samplers need random
access to arbitrary rows per step, which TFDS' record files do not give cheaply.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import tensorflow_datasets as tfds

from msdn_tf.data.base import ZSLData
from msdn_tf.data.datasets import BENCHMARKS

SPLITS = ("trainval", "test_seen", "test_unseen", "train", "val")
CHUNK = 256


class MsdnZslConfig(tfds.core.BuilderConfig):
    """One dataset of the msdn-tf table.

    Args:
        dataset: the msdn-tf dataset name (``demo``, ``cub``, ``sun``, ``awa2``).
        feature_dim: channels ``F`` when known (2048 for ResNet-101), else ``None``.
        dtype: ``float16`` or ``float32`` for ``feature_map``.
    """

    def __init__(self, *, dataset: str, feature_dim=None, dtype: str = "float16", **kwargs):
        super().__init__(**kwargs)
        self.dataset = dataset
        self.feature_dim = feature_dim
        self.dtype = dtype


MANUAL_INSTRUCTIONS = """\
Place the files of one dataset in a folder (see docs/data.md of msdn-tf) and pass it
as manual_dir: either the reference feature_map_ResNet_101_{CUB,SUN,AWA2}.hdf5 (optionally
with att_splits.mat and the attribute-name file for names), or the xlsa17 files
(att_splits.mat, res101.mat or image_list.npz, {DS}_attribute.pkl, attribute names) plus
features_resnet101_448.hdf5 made by `python -m msdn_tf.extract`. For the demo config, a
folder with one demo_*.hdf5 (generated when absent).
"""


class MsdnZsl(tfds.core.GeneratorBasedBuilder):
    """Zero-shot learning feature maps (CUB, SUN, AWA2, demo) with the xlsa17 splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Channel-last, region-normalised feature maps; xlsa17 proposed splits."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    BUILDER_CONFIGS = [
        MsdnZslConfig(
            name="demo",
            dataset="demo",
            feature_dim=None,
            dtype="float32",
            description="msdn-tf's synthetic demo dataset (any DemoConfig)",
        ),
    ] + [
        MsdnZslConfig(
            name=facts.name, dataset=facts.name, feature_dim=facts.feature_dim, description=facts.summary_line()
        )
        for facts in BENCHMARKS.values()
    ]

    def _info(self):
        cfg = self.builder_config
        shape = (None, cfg.feature_dim)  # regions: 196 (14x14) or 49 (7x7)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "feature_map": tfds.features.Tensor(
                        shape=shape, dtype=np.dtype(cfg.dtype), encoding="bytes" if shape.count(None) > 1 else "none"
                    ),
                    "label": tfds.features.Scalar(dtype=np.int64),
                    "image_file": tfds.features.Text(),
                }
            ),
            supervised_keys=("feature_map", "label"),
            metadata=tfds.core.MetadataDict(),
            homepage="https://github.com/shiming-chen/MSDN",
        )

    # ------------------------------------------------------------------ reading the manual files
    def _load(self, manual_dir: str) -> tuple:
        """``(ZSLData, image_files)`` of the manual folder, through the msdn-tf dataset table."""
        from msdn_tf.config import DemoConfig, resolve_config
        from msdn_tf.data.hdf5 import load_feature_map_hdf5
        from msdn_tf.data.registry import load_dataset

        manual_dir = os.fspath(manual_dir)
        name = self.builder_config.dataset
        if name == "demo":
            found = sorted(glob.glob(os.path.join(manual_dir, "demo_*.hdf5")))
            if len(found) > 1:
                raise ValueError(f"{manual_dir}: {len(found)} demo_*.hdf5 files; keep one")
            if not found:
                from msdn_tf.data.demo import ensure_demo_file

                found = [str(ensure_demo_file(DemoConfig(), manual_dir))]
            return load_feature_map_hdf5(found[0], name="demo"), None
        config = resolve_config(name, flags=[("data.data_dir", str(manual_dir), "manual_dir")])
        data = load_dataset(config)
        return data, _image_files(manual_dir, name, len(data.labels))

    def _manual_folder(self, dl_manager):
        """The manual folder. For ``demo`` it may be empty or absent: the demo file is generated there.

        ``dl_manager.manual_dir`` refuses an empty folder (TFDS' "does not exist or is
        empty"), so for ``demo`` the configured folder is read before that check.
        """
        if self.builder_config.dataset == "demo":
            folder = getattr(dl_manager, "_manual_dir", None)
            if folder:
                os.makedirs(os.fspath(folder), exist_ok=True)
                return folder
        return dl_manager.manual_dir

    def _split_generators(self, dl_manager):
        data, files = self._load(self._manual_folder(dl_manager))
        self.info.metadata.update(class_metadata(data))
        out = {}
        for split in SPLITS:
            loc = getattr(data, f"{split}_loc")
            if loc is not None and len(loc):
                out[split] = self._generate_examples(data, np.asarray(loc), files)
        return out

    def _generate_examples(self, data: ZSLData, loc: np.ndarray, files):
        from msdn_tf.data.cache import normalize_regions

        dtype = np.dtype(self.builder_config.dtype)
        for start in range(0, loc.size, CHUNK):
            rows = loc[start : start + CHUNK]
            x = normalize_regions(data.features.read(rows)).astype(dtype)
            for i, row in enumerate(rows):
                yield (
                    int(row),
                    {
                        "feature_map": x[i],
                        "label": int(data.labels[row]),
                        "image_file": files[row] if files is not None else "",
                    },
                )


def class_metadata(data: ZSLData) -> dict:
    """The class structure of ``data`` as JSON-friendly lists (stored in ``info.metadata``)."""
    return {
        "dataset": data.name,
        "class_names": list(data.class_names),
        "attribute_names": list(data.attribute_names),
        "seen_classes": [int(c) for c in data.seen_classes],
        "unseen_classes": [int(c) for c in data.unseen_classes],
        "att": np.asarray(data.att, dtype=np.float64).round(8).tolist(),
        "w2v": np.asarray(data.w2v, dtype=np.float64).round(8).tolist(),
        "num_regions": int(data.num_regions),
        "feature_dim": int(data.feature_dim),
        "features": "channel-last (R, F), every region L2-normalised (eps 1e-12)",
    }


def _image_files(manual_dir: str, name: str, n: int):
    """Relative image paths of the image list beside the metadata, when there is one with ``n`` rows."""
    from msdn_tf.data import xlsa17
    from msdn_tf.errors import DataError

    try:
        found = xlsa17.find_xlsa17_files(manual_dir, name)
    except DataError:
        return None
    if not found.get("image_list"):
        return None
    files = xlsa17.load_images(found["image_list"])["image_files"]
    return files if len(files) == n else None
