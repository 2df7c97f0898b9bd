"""The benchmarks from the REAL xlsa17 metadata (../shared) with small generated feature maps.

The feature maps of the real datasets are 19-60 GB and not available here, so
each test writes maps of the real image count but tiny size (2x2 regions x 8
channels, or 1x1 x 1) in the layout our extractor writes, next to links to the
real metadata files, and goes through the same dataset table as training.
"""

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from msdn_tf.config import resolve_config
from msdn_tf.data import xlsa17
from msdn_tf.data.cache import MemmapFeatures
from msdn_tf.data.hdf5 import write_feature_map_hdf5
from msdn_tf.data.pipeline import ClassBalancedSampler, RandomBatchSampler, make_sampler
from msdn_tf.data.registry import DATASETS, load_dataset
from msdn_tf.errors import DataError
from tests.helpers import shared_zsl_dir

# dataset: (images, K, C, seen, unseen, trainval, test_seen, test_unseen), docs/reference.md §1.2
TABLE = {
    "cub": (11788, 312, 200, 150, 50, 7057, 1764, 2967),
    "sun": (14340, 102, 717, 645, 72, 10320, 2580, 1440),
    "awa2": (37322, 85, 50, 40, 10, 23527, 5882, 7913),
}
METADATA = {
    "cub": ("att_splits.mat", "image_list.npz", "CUB_attribute.pkl", "attributes.txt", "sent_splits.mat"),
    "sun": ("att_splits.mat", "image_list.npz", "SUN_attribute.pkl", "attributes.mat"),
    "awa2": ("att_splits.mat", "image_list.npz", "AWA2_attribute.pkl", "predicates.txt"),
}


def link_metadata(name: str, folder: Path) -> Path:
    """``folder`` with symbolic links to the real metadata files of ``name``."""
    src = shared_zsl_dir() / xlsa17.DATASET_DIRS[name]
    if not (src / "att_splits.mat").exists():
        pytest.skip(f"{src}/att_splits.mat not found")
    folder.mkdir(parents=True, exist_ok=True)
    for f in METADATA[name]:
        os.symlink(src / f, folder / f)
    return folder


def write_extracted_features(path: Path, n: int, channels: int = 8, side: int = 2, seed: int = 0) -> Path:
    """A feature file as ``msdn_tf.extract`` writes it: ``feature_map`` (N, F, h, w) float32, chunks of rows."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "feature_map",
            data=rng.random((n, channels, side, side), dtype=np.float32),
            chunks=(1, channels, side, side),
        )
        f.attrs["image_size"] = 64
    return path


def test_registry_table_is_the_reference_table():
    for name, (n, k, c, s, u, tv, ts, tu) in TABLE.items():
        assert DATASETS[name].expected == {
            "images": n,
            "attributes": k,
            "classes": c,
            "seen_classes": s,
            "unseen_classes": u,
            "trainval": tv,
            "test_seen": ts,
            "test_unseen": tu,
        }


@pytest.mark.parametrize("name", ["cub", "sun", "awa2"])
def test_real_metadata_through_the_registry_xlsa17_layout(tmp_path, name):
    n = TABLE[name][0]
    folder = link_metadata(name, tmp_path / "data" / xlsa17.DATASET_DIRS[name])
    write_extracted_features(folder / "tiny.hdf5", n, channels=1, side=1)
    # --data-dir may be the dataset folder or its parent
    cfg = resolve_config(name, overrides=[f"data.data_dir={tmp_path / 'data'}", "data.feature_file=tiny.hdf5"])
    data = load_dataset(cfg)  # checks the table's expected sizes
    s = data.summary()
    assert (
        s["images"],
        s["attributes"],
        s["classes"],
        s["seen_classes"],
        s["unseen_classes"],
        s["trainval"],
        s["test_seen"],
        s["test_unseen"],
    ) == TABLE[name]
    splits = xlsa17.load_att_splits(folder / "att_splits.mat")
    assert data.class_names == splits["allclasses_names"]
    assert len(data.attribute_names) == TABLE[name][1] and not data.attribute_names[0].startswith("attribute_")
    # seen/unseen ids are not contiguous ranges (§1.2) and split the classes
    assert len(np.union1d(data.seen_classes, data.unseen_classes)) == TABLE[name][2]
    # test_seen images are of seen classes, every class has images
    assert np.isin(data.labels[data.test_seen_loc], data.seen_classes).all()
    assert np.bincount(data.labels, minlength=TABLE[name][2]).min() > 0


def test_awa2_class_balanced_sampler_real_labels(tmp_path):
    """§6: AWA2 has 40 seen classes -> all 40 classes x max(50 // 40, 1) = 1 image: batch 40."""
    folder = link_metadata("awa2", tmp_path / "AWA2")
    write_extracted_features(folder / "features_resnet101_448.hdf5", 37322, channels=1, side=1)
    cfg = resolve_config("awa2", overrides=[f"data.data_dir={folder}"])
    assert cfg.data.sampler == "class_balanced" and cfg.data.batch_size == 50
    data = load_dataset(cfg)
    sampler = make_sampler(data, cfg.data.sampler, cfg.data.batch_size, cfg.train.seed)
    assert isinstance(sampler, ClassBalancedSampler)
    assert (sampler.n_classes, sampler.per_class) == (40, 1)
    for step in (0, 1, 23526):
        batch = sampler.batch(step)
        assert batch.size == 40 and np.isin(batch, data.trainval_loc).all()
        assert sorted(data.labels[batch].tolist()) == data.seen_classes.tolist()  # each seen class once
    # the images of a class vary between steps; the same step gives the same batch
    assert not np.array_equal(sampler.batch(0), sampler.batch(1))
    np.testing.assert_array_equal(sampler.batch(7), make_sampler(data, "class_balanced", 50, cfg.train.seed).batch(7))
    # over many steps every class draws uniformly (with replacement) from its trainval images
    cls = data.seen_classes[0]
    rows = np.concatenate([sampler.batch(s) for s in range(300)])
    drawn = rows[data.labels[rows] == cls]
    pool = data.trainval_loc[data.labels[data.trainval_loc] == cls]
    assert np.isin(drawn, pool).all() and len(np.unique(drawn)) > 0.5 * min(300, pool.size)


def test_sun_and_cub_samplers_real_labels(tmp_path):
    folder = link_metadata("sun", tmp_path / "SUN")
    write_extracted_features(folder / "features_resnet101_448.hdf5", 14340, channels=1, side=1)
    data = load_dataset(resolve_config("sun", overrides=[f"data.data_dir={folder}"]))
    s = ClassBalancedSampler(data.trainval_loc, data.labels, 50, seed=2339)
    b = s.batch(3)
    assert b.size == 50 and len(np.unique(data.labels[b])) == 50  # 50 distinct of 645 seen classes, 1 each
    folder = link_metadata("cub", tmp_path / "CUB")
    write_extracted_features(folder / "features_resnet101_448.hdf5", 11788, channels=1, side=1)
    data = load_dataset(resolve_config("cub", overrides=[f"data.data_dir={folder}"]))
    r = RandomBatchSampler(data.trainval_loc, 50, seed=214)
    b = r.batch(0)
    assert b.size == 50 and len(np.unique(b)) == 50 and np.isin(b, data.trainval_loc).all()


def test_real_cub_trains_xlsa17_layout_with_cache(tmp_path, capsys):
    from msdn_tf.cli import train

    folder = link_metadata("cub", tmp_path / "CUB")
    write_extracted_features(folder / "features_resnet101_448.hdf5", 11788)
    run_dir = tmp_path / "run"
    rc = train.main(
        [
            "--dataset",
            "cub",
            "--data-dir",
            str(folder),
            "--run-dir",
            str(run_dir),
            "--set",
            "train.iterations=4",
            "--set",
            "train.eval_every=2",
            "--set",
            "train.verbose=0",
            "--set",
            "data.cache=true",
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["final"]["step"] == 4
    results = json.loads((run_dir / "results.json").read_text())
    assert results["data"]["images"] == 11788 and results["data"]["regions"] == 4
    assert results["data"]["channels"] == 8
    # cub.yaml evaluates at the reference's points (after steps 1, 1 + e, ...) and after the last step.
    assert [h["step"] for h in results["history"]] == [0, 1, 3, 4]
    caches = list((tmp_path / "cache").glob("*.npy"))
    assert [c.name for c in caches] == ["features_resnet101_448.regions_float16.npy"]
    assert MemmapFeatures(str(caches[0])).shape == (11788, 4, 8)


def test_real_cub_reference_layout_takes_names_from_the_folder(tmp_path):
    """Layout (a): a feature-map HDF5 without names; class/attribute names from att_splits.mat/attributes.txt."""
    src = link_metadata("cub", tmp_path / "meta")
    splits = xlsa17.load_att_splits(src / "att_splits.mat")
    images = xlsa17.load_image_list(src / "image_list.npz")
    w2v = xlsa17.load_attribute_vectors(src / "CUB_attribute.pkl")
    folder = tmp_path / "ref"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_feature_map_hdf5(
        folder / "feature_map_ResNet_101_CUB.hdf5",
        feature_map=rng.random((11788, 2, 1, 1), dtype=np.float32),
        labels=images["labels"].astype(np.uint16),
        trainval_loc=splits["trainval_loc"],
        test_seen_loc=splits["test_seen_loc"],
        test_unseen_loc=splits["test_unseen_loc"],
        att=splits["att"],
        original_att=splits["original_att"],
        w2v_att=w2v,
    )
    cfg = resolve_config("cub", overrides=[f"data.data_dir={folder}"])
    data = load_dataset(cfg)
    assert data.class_names[0] == "class_000"  # nothing to take names from
    for f in ("att_splits.mat", "attributes.txt"):
        os.symlink(src / f, folder / f)
    data = load_dataset(cfg)
    assert data.class_names == splits["allclasses_names"] and data.class_names[0] == "002.Laysan_Albatross"
    assert data.attribute_names[0] == "has_bill_shape::curved_(up_or_down)"
    assert data.source.endswith("feature_map_ResNet_101_CUB.hdf5")


def test_feature_file_with_wrong_number_of_images(tmp_path):
    folder = link_metadata("cub", tmp_path / "CUB")
    write_extracted_features(folder / "features_resnet101_448.hdf5", 11788 - 5, channels=1, side=1)
    cfg = resolve_config("cub", overrides=[f"data.data_dir={folder}"])
    with pytest.raises(
        DataError,
        match=r"features_resnet101_448.hdf5: the feature source has 11783 images but "
        r"the image list .*image_list.npz has 11788",
    ):
        load_dataset(cfg)


def test_missing_files_error_names_both_layouts(tmp_path):
    folder = link_metadata("cub", tmp_path / "CUB")
    os.remove(folder / "CUB_attribute.pkl")
    cfg = resolve_config("cub", overrides=[f"data.data_dir={tmp_path}"])
    with pytest.raises(DataError) as err:
        load_dataset(cfg)
    msg = str(err.value)
    for needed in (
        "feature_map_ResNet_101_CUB.hdf5",
        "att_splits.mat  [found",
        "image_list.npz",
        "CUB_attribute.pkl  [missing]",
        "attributes.txt",
        "features_resnet101_448.hdf5  [missing]",
        "docs/data.md",
    ):
        assert needed in msg, (needed, msg)
    # xlsa17 files complete but the word vectors missing: the xlsa17 reader names the file it lacks
    write_extracted_features(folder / "features_resnet101_448.hdf5", 11788, channels=1, side=1)
    with pytest.raises(DataError, match="CUB_attribute.pkl"):
        load_dataset(cfg)


def test_truncated_or_wrong_feature_files_name_the_file(tmp_path):
    folder = link_metadata("cub", tmp_path / "CUB")
    good = write_extracted_features(tmp_path / "good.hdf5", 11788, channels=1, side=1)
    raw = good.read_bytes()
    (folder / "features_resnet101_448.hdf5").write_bytes(raw[: len(raw) // 3])
    cfg = resolve_config("cub", overrides=[f"data.data_dir={folder}"])
    with pytest.raises(DataError, match="features_resnet101_448.hdf5: cannot open as HDF5"):
        load_dataset(cfg)
    with h5py.File(folder / "other.hdf5", "w") as f:
        f["features"] = np.zeros((11788, 2048), np.float32)  # pooled features, not maps
    cfg = resolve_config("cub", overrides=[f"data.data_dir={folder}", "data.feature_file=other.hdf5"])
    with pytest.raises(DataError, match="other.hdf5: no key 'feature_map'"):
        load_dataset(cfg)
