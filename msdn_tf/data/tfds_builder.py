"""A tensorflow-datasets builder over the manual files: ``tfds.load("msdn_zsl/cub", ...)``.

Importing this module registers the builder ``msdn_zsl`` with configs ``demo``,
``cub``, ``sun`` and ``awa2``. Nothing is downloaded: ``manual_dir`` is the folder
that ``python -m msdn_tf.train --data-dir`` takes (either layout of docs/data.md;
for ``demo``, a folder holding one ``demo_*.hdf5`` of the default
:class:`~msdn_tf.config.DemoConfig`, or no folder at all: then the builder reads the demo
file that ``python -m msdn_tf.train --dataset demo`` uses, under ``~/.cache/msdn_tf/demo``,
generating it there if needed, so the demo data is never copied into ``downloads/manual``)::

    import tensorflow_datasets as tfds
    import msdn_tf.data.tfds_builder  # registers "msdn_zsl"

    splits, info = tfds.load(
        "msdn_zsl/cub", data_dir="~/tensorflow_datasets", with_info=True,
        download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(manual_dir="DIR")})
    ds = splits["trainval"]          # {"feature_map": (196, 2048) float16, "label": int64, "image_file": str}
    info.features["label"].names     # the class names (tfds.features.ClassLabel)
    info.metadata["seen_classes"]    # plus unseen_classes, att, w2v, attribute_names, ...

Splits: ``trainval``, ``test_seen``, ``test_unseen``, and ``train``/``val`` when the
metadata has them. Examples are the feature maps of one image, channel-last
``(R, F)`` with static shapes per config (``(196, 2048)`` for CUB, SUN and AWA2: ResNet-101
at 448 pixels; ``(49, 256)`` for the demo), every region L2-normalised (the model normalises again, so this is
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

from msdn_tf.config import DemoConfig
from msdn_tf.data.base import ZSLData
from msdn_tf.data.datasets import BENCHMARKS

_DEMO = DemoConfig()  # the demo of configs/demo.yaml (the same sizes): static shapes of msdn_zsl/demo

SPLITS = ("trainval", "test_seen", "test_unseen", "train", "val")
CHUNK = 256

DESCRIPTION = """\
ResNet-101 feature maps of zero-shot learning benchmarks with the proposed splits of Xian et
al. (xlsa17), channel-last and L2-normalised per region, with the class attributes, attribute
word vectors and seen/unseen classes in the metadata: the inputs of MSDN (msdn-tf).
Built from local files (manual_dir); nothing is downloaded.
"""

MSDN_CITATION = """\
@inproceedings{chen2022msdn,
  title={MSDN: Mutually Semantic Distillation Network for Zero-Shot Learning},
  author={Chen, Shiming and Hong, Ziming and Xie, Guo-Sen and Yang, Wenhan and Peng, Qinmu and
          Wang, Kai and Zhao, Jian and You, Xinge},
  booktitle={IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={7612--7621},
  year={2022}
}"""

XLSA17_CITATION = """\
@article{xian2019zsl,
  title={Zero-Shot Learning -- A Comprehensive Evaluation of the Good, the Bad and the Ugly},
  author={Xian, Yongqin and Lampert, Christoph H. and Schiele, Bernt and Akata, Zeynep},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  volume={41},
  number={9},
  pages={2251--2265},
  year={2019}
}"""

DATASET_CITATIONS = {
    "cub": """\
@techreport{wah2011cub,
  title={The Caltech-UCSD Birds-200-2011 Dataset},
  author={Wah, Catherine and Branson, Steve and Welinder, Peter and Perona, Pietro and Belongie, Serge},
  institution={California Institute of Technology},
  number={CNS-TR-2011-001},
  year={2011}
}""",
    "sun": """\
@inproceedings{patterson2012sun,
  title={SUN Attribute Database: Discovering, Annotating, and Recognizing Scene Attributes},
  author={Patterson, Genevieve and Hays, James},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={2751--2758},
  year={2012}
}""",
    "awa2": XLSA17_CITATION.replace("xian2019zsl", "xian2019awa2"),
    "demo": "",
}


class MsdnZslConfig(tfds.core.BuilderConfig):
    """One dataset of the msdn-tf table.

    Args:
        dataset: the msdn-tf dataset name (``demo``, ``cub``, ``sun``, ``awa2``).
        regions: regions ``R`` of a feature map (196 = 14 x 14).
        feature_dim: channels ``F`` (2048 for ResNet-101).
        num_classes: classes ``C`` (the ``label`` feature's size).
        dtype: ``float16`` or ``float32`` for ``feature_map``.
        citation: BibTeX of the dataset itself (MSDN's and xlsa17's are added to every config).
    """

    def __init__(
        self, *, dataset: str, regions: int, feature_dim: int, num_classes: int, dtype="float16", citation="", **kwargs
    ):
        super().__init__(**kwargs)
        self.dataset = dataset
        self.regions = int(regions)
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        self.citation = citation


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

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Channel-last, region-normalised feature maps; xlsa17 proposed splits.",
        "2.0.0": "label is a ClassLabel with the class names; static feature_map shapes per config.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    BUILDER_CONFIGS = [
        MsdnZslConfig(
            name="demo",
            dataset="demo",
            regions=_DEMO.map_size**2,
            feature_dim=_DEMO.feature_dim,
            num_classes=_DEMO.num_classes,
            dtype="float32",
            description="msdn-tf's synthetic demo dataset (the default DemoConfig, as make demo trains on)",
        ),
    ] + [
        MsdnZslConfig(
            name=facts.name,
            dataset=facts.name,
            regions=facts.regions,
            feature_dim=facts.feature_dim,
            num_classes=facts.classes,
            description=facts.summary_line(),
            citation=DATASET_CITATIONS[facts.name],
        )
        for facts in BENCHMARKS.values()
    ]

    def _info(self):
        cfg = self.builder_config
        return self.dataset_info_from_configs(
            description=DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "feature_map": tfds.features.Tensor(
                        shape=(cfg.regions, cfg.feature_dim), dtype=np.dtype(cfg.dtype), doc="(R, F) region features"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=cfg.num_classes, doc="class id (names: .names)"),
                    "image_file": tfds.features.Text(doc="image path of the xlsa17 image list ('' when unknown)"),
                }
            ),
            supervised_keys=("feature_map", "label"),
            metadata=tfds.core.MetadataDict(),
            homepage="https://github.com/shiming-chen/MSDN",
            citation="\n\n".join(c for c in (MSDN_CITATION, XLSA17_CITATION, cfg.citation) if c),
        )

    # ------------------------------------------------------------------ reading the manual files
    def _load(self, manual_dir: str) -> tuple:
        """``(ZSLData, image_files)`` of the manual folder, through the msdn-tf dataset table."""
        from msdn_tf.config import resolve_config
        from msdn_tf.data.hdf5 import load_feature_map_hdf5
        from msdn_tf.data.registry import load_dataset

        manual_dir = None if manual_dir is None else os.fspath(manual_dir)
        name = self.builder_config.dataset
        if name == "demo":
            found = sorted(glob.glob(os.path.join(manual_dir, "demo_*.hdf5"))) if manual_dir else []
            if len(found) > 1:
                raise ValueError(f"{manual_dir}: {len(found)} demo_*.hdf5 files; keep one")
            if not found:  # the demo file msdn-tf trains on (generated once, in its cache), not a copy
                from msdn_tf.data.demo import ensure_demo_file

                found = [str(ensure_demo_file(DemoConfig(), None))]
            return load_feature_map_hdf5(found[0], name="demo"), None
        config = resolve_config(name, flags=[("data.data_dir", str(manual_dir), "manual_dir")])
        data = load_dataset(config)
        return data, _image_files(manual_dir, name, len(data.labels))

    def _manual_folder(self, dl_manager):
        """The manual folder, or None for ``demo`` without one (then the msdn-tf demo file is read).

        ``dl_manager.manual_dir`` refuses an empty or absent folder (TFDS' "does not exist
        or is empty"), so for ``demo`` the configured folder is read before that check.
        """
        if self.builder_config.dataset == "demo":
            try:
                return dl_manager.manual_dir
            except AssertionError:  # no manual folder, or an empty one
                return None
        return dl_manager.manual_dir

    def _split_generators(self, dl_manager):
        data, files = self._load(self._manual_folder(dl_manager))
        self._check_shapes(data)
        self.info.features["label"].names = [str(n) for n in data.class_names]
        self.info.metadata.update(class_metadata(data))
        out = {}
        for split in SPLITS:
            loc = getattr(data, f"{split}_loc")
            if loc is not None and len(loc):
                out[split] = self._generate_examples(data, np.asarray(loc), files)
        return out

    def _check_shapes(self, data: ZSLData) -> None:
        cfg = self.builder_config
        want = (cfg.regions, cfg.feature_dim, cfg.num_classes)
        got = (int(data.num_regions), int(data.feature_dim), len(data.class_names))
        if got != want:
            raise ValueError(
                f"{data.source}: msdn_zsl/{cfg.name} holds (regions, channels, classes) = {want}, the files give "
                f"{got}" + (" (the demo config is the default DemoConfig's demo)" if cfg.dataset == "demo" else "")
            )

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
