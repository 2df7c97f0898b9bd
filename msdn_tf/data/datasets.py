"""The facts of the benchmark datasets, one entry each: names, folders, sizes, sign rule, shapes.

This is the ONE place where a benchmark's numbers are spelled out. The dataset table
(:mod:`msdn_tf.data.registry`) builds its entries from it (expected sizes, the
non-negative attribute rule, the upstream file stem); the xlsa17 reader takes folder
names and the sign rule from it; the TFDS builder configs, the input-pipeline benchmark
shapes (:mod:`msdn_tf.perf.input_pipeline`) and the synthetic serving model
(:mod:`msdn_tf.perf.serving_latency`) read it too.

Why a separate module rather than the registry itself: the registry imports the loaders
(xlsa17, hdf5, custom data), and the loaders need these facts. A table that imports
nothing but the standard library lets every module read it without an import circle:
``registry -> loaders -> datasets``, never back.

Example::

    from msdn_tf.data.datasets import BENCHMARKS, folder_name

    BENCHMARKS["cub"].expected()["images"]   # 11788
    folder_name("awa2")                       # "AWA2"

Reference: Xian et al., "Zero-Shot Learning -- A Comprehensive Evaluation of the Good,
the Bad and the Ugly", TPAMI 2019 (the xlsa17 proposed splits, Table 1); the
non-negative AWA2 attributes are docs/reference.md §1.4.
"""

from __future__ import annotations

import dataclasses
from typing import Dict


@dataclasses.dataclass(frozen=True)
class BenchmarkFacts:
    """The fixed facts of one benchmark dataset.

    Attributes:
        name: the ``--dataset`` name (lower case).
        folder: the upstream folder and file stem (``CUB`` -> ``CUB/``, ``CUB_attribute.pkl``,
            ``feature_map_ResNet_101_CUB.hdf5``).
        title: the dataset's full name, for descriptions.
        images, attributes, classes, seen_classes, unseen_classes, trainval, test_seen,
            test_unseen: sizes of the xlsa17 proposed split.
        nonnegative_att: negative class attributes are set to 0 before normalising (§1.4).
        feature_dim, regions: the ResNet-101 feature map of a 448-pixel image (F, 14 x 14).
        word_dim: length of an attribute's word vector (GloVe, 300).
    """

    name: str
    folder: str
    title: str
    images: int
    attributes: int
    classes: int
    seen_classes: int
    unseen_classes: int
    trainval: int
    test_seen: int
    test_unseen: int
    nonnegative_att: bool = False
    feature_dim: int = 2048
    regions: int = 196
    word_dim: int = 300

    def expected(self) -> Dict[str, int]:
        """The sizes a loaded dataset must have (keys of ``ZSLData.summary()``)."""
        return {
            "images": self.images,
            "attributes": self.attributes,
            "classes": self.classes,
            "seen_classes": self.seen_classes,
            "unseen_classes": self.unseen_classes,
            "trainval": self.trainval,
            "test_seen": self.test_seen,
            "test_unseen": self.test_unseen,
        }

    def summary_line(self) -> str:
        """``"CUB-200-2011, 11,788 images, 312 attributes, 150/50 classes"``."""
        return (
            f"{self.title}, {self.images:,} images, {self.attributes} attributes, "
            f"{self.seen_classes}/{self.unseen_classes} classes"
        )


BENCHMARKS: Dict[str, BenchmarkFacts] = {
    b.name: b
    for b in (
        BenchmarkFacts(
            "cub",
            "CUB",
            "CUB-200-2011",
            images=11788,
            attributes=312,
            classes=200,
            seen_classes=150,
            unseen_classes=50,
            trainval=7057,
            test_seen=1764,
            test_unseen=2967,
        ),
        BenchmarkFacts(
            "sun",
            "SUN",
            "SUN attribute",
            images=14340,
            attributes=102,
            classes=717,
            seen_classes=645,
            unseen_classes=72,
            trainval=10320,
            test_seen=2580,
            test_unseen=1440,
        ),
        BenchmarkFacts(
            "awa2",
            "AWA2",
            "Animals with Attributes 2",
            images=37322,
            attributes=85,
            classes=50,
            seen_classes=40,
            unseen_classes=10,
            trainval=23527,
            test_seen=5882,
            test_unseen=7913,
            nonnegative_att=True,
        ),
    )
}


def folder_name(name: str) -> str:
    """The upstream folder/file stem of a dataset name; an unknown name is upper-cased (``apy`` -> ``APY``)."""
    facts = BENCHMARKS.get(str(name).lower())
    return facts.folder if facts is not None else str(name).upper()


def nonnegative_att(name: str) -> bool:
    """Whether a dataset's negative class attributes are set to 0 (AWA2, docs/reference.md §1.4)."""
    facts = BENCHMARKS.get(str(name).lower())
    return bool(facts is not None and facts.nonnegative_att)
