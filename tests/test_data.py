"""The feature-map HDF5 reader/writer, the demo generator, samplers and the dataset table."""

import numpy as np
import pytest

from msdn_tf.config import resolve_config
from msdn_tf.data.base import ArrayFeatures, ZSLData, class_attributes_for_model
from msdn_tf.data.demo import ensure_demo_file, generate_demo_arrays
from msdn_tf.data.hdf5 import load_feature_map_hdf5, write_feature_map_hdf5
from msdn_tf.data.pipeline import ClassBalancedSampler, EpochSampler, RandomBatchSampler, train_dataset
from msdn_tf.data.registry import load_dataset
from msdn_tf.errors import DataError
from tests.helpers import tiny_demo

TINY_DEMO = tiny_demo()


def test_hdf5_round_trip_channel_first_to_regions(rng, tmp_path):
    fmap = rng.random((5, 4, 2, 3)).astype("float32")  # (N, F, H, W)
    att = rng.random((3, 2)) - 0.3
    path = write_feature_map_hdf5(
        tmp_path / "f.hdf5",
        feature_map=fmap,
        labels=[0, 0, 1, 2, 2],
        trainval_loc=[0, 2],
        test_seen_loc=[1],
        test_unseen_loc=[3, 4],
        att=att,
        w2v_att=rng.random((2, 6)),
    )
    data = load_feature_map_hdf5(path, nonnegative_att=True)
    assert data.features.shape == (5, 6, 4)
    rows = np.array([4, 0, 4])
    np.testing.assert_array_equal(data.features.read(rows), fmap[rows].reshape(3, 4, 6).transpose(0, 2, 1))
    np.testing.assert_allclose(data.att, class_attributes_for_model(att, nonnegative=True), rtol=1e-6)
    assert data.att.min() >= 0 and list(data.seen_classes) == [0, 1] and list(data.unseen_classes) == [2]


def test_hdf5_errors_name_file_and_key(rng, tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_feature_map_hdf5(tmp_path / "nope.hdf5")
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="junk.hdf5"):
        load_feature_map_hdf5(junk)
    import h5py

    partial = tmp_path / "partial.hdf5"
    with h5py.File(partial, "w") as f:
        f["feature_map"] = np.zeros((2, 3, 1, 1), "float32")
        f["labels"] = [0, 1]
    with pytest.raises(DataError, match="partial.hdf5: missing key 'trainval_loc'"):
        load_feature_map_hdf5(partial)


def test_validate_catches_inconsistent_splits(rng):
    base = dict(
        name="t",
        features=ArrayFeatures(np.zeros((6, 2, 3))),
        labels=[0, 0, 1, 2, 2, 2],
        trainval_loc=[0],
        test_seen_loc=[1],
        test_unseen_loc=[3, 4],
        att=np.eye(3),
        w2v=np.ones((3, 2)),
        class_names=list("abc"),
        attribute_names=list("xyz"),
        source="t.h5",
    )
    ZSLData(**base)
    with pytest.raises(DataError, match="disjoint"):
        ZSLData(**{**base, "trainval_loc": [0, 5]})
    with pytest.raises(DataError, match=r"'test_unseen_loc' must hold 0-based row indices in \[0, 6\)"):
        ZSLData(**{**base, "test_unseen_loc": [3, 6]})
    with pytest.raises(DataError, match="'labels' must be 0-based"):
        ZSLData(**{**base, "labels": [0, 0, 1, 2, 2, 3]})
    with pytest.raises(DataError, match="w2v_att"):
        ZSLData(**{**base, "w2v": np.ones((2, 2))})
    with pytest.raises(DataError, match="test_seen_loc"):
        ZSLData(**{**base, "test_seen_loc": [2]})


def test_demo_is_seeded_and_read_through_the_standard_loader(tmp_path):
    a, b = generate_demo_arrays(TINY_DEMO), generate_demo_arrays(TINY_DEMO)
    np.testing.assert_array_equal(a["feature_map"], b["feature_map"])
    assert a["feature_map"].min() >= 0  # post-ReLU-like
    path = ensure_demo_file(TINY_DEMO, tmp_path)
    assert ensure_demo_file(TINY_DEMO, tmp_path) == path  # cached
    data = load_feature_map_hdf5(path, name="demo")
    assert data.summary()["unseen_classes"] == 3 and data.summary()["regions"] == 9
    assert len(data.train_loc) + len(data.val_loc) == len(data.trainval_loc)
    assert data.attribute_names[0].startswith("has_")
    # Word vectors relate to the visual patterns: not just noise.
    assert np.linalg.matrix_rank(data.w2v) == TINY_DEMO.num_attributes


def test_samplers_follow_the_reference_and_are_stateless(rng):
    labels = np.repeat(np.arange(10), 7)
    pool = np.arange(60)  # classes 0..8 with 7 images, class 9 absent -> trainval pool
    s = RandomBatchSampler(pool, 50, seed=3)
    b = s.batch(5)
    assert len(b) == 50 and len(set(b)) == 50 and set(b) <= set(pool)
    np.testing.assert_array_equal(b, RandomBatchSampler(pool, 50, seed=3).batch(5))
    assert not np.array_equal(b, s.batch(6))

    cb = ClassBalancedSampler(pool, labels, 50, seed=0)  # 9 classes < 50: all classes, 50 // 9 = 5 each
    b = cb.batch(0)
    assert len(b) == 45 and np.all(np.bincount(labels[b], minlength=10)[:9] == 5)
    many = ClassBalancedSampler(np.arange(70), np.arange(70), 50, seed=0)  # 70 classes > 50: 50 distinct x 1
    b = many.batch(1)
    assert len(b) == 50 and len(set(labels[b] if False else b)) == 50

    ep = EpochSampler(pool, 20, seed=1)  # 3 batches per epoch, every image once
    epoch = np.concatenate([ep.batch(i) for i in range(3)])
    assert sorted(epoch) == list(pool)
    assert not np.array_equal(ep.batch(0), ep.batch(3))


def test_train_dataset_yields_the_sampler_batches(tmp_path):
    cfg = resolve_config("demo")
    cfg.demo = TINY_DEMO
    cfg.data.data_dir = str(tmp_path)
    data = load_dataset(cfg)
    sampler = RandomBatchSampler(data.trainval_loc, 4, seed=0)
    batches = list(train_dataset(data, sampler, start_step=2, num_steps=2))
    assert len(batches) == 2
    x, y = batches[1]
    rows = sampler.batch(3)
    np.testing.assert_array_equal(x.numpy(), data.features.read(rows))
    np.testing.assert_array_equal(y.numpy(), data.labels[rows])


def test_registry_errors_name_what_is_needed(tmp_path):
    cfg = resolve_config("cub")
    with pytest.raises(DataError, match="(?s)needs --data-dir.*feature_map_ResNet_101_CUB.hdf5"):
        load_dataset(cfg)
    cfg.data.data_dir = str(tmp_path / "missing")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(cfg)
    cfg.data.data_dir = str(tmp_path)
    with pytest.raises(DataError, match="feature_map_ResNet_101_CUB.hdf5: not found"):
        load_dataset(cfg)
    cfg.data.dataset = "imagenet"
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset(cfg)
