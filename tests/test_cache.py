"""The prepared feature cache: equality with the HDF5 rows, staleness, atomic writes, reading."""

import json
import os
import pickle

import numpy as np
import pytest

from msdn_tf.config import resolve_config
from msdn_tf.data.cache import (
    MemmapFeatures,
    build_cache_from_hdf5,
    cache_path_for,
    cache_status,
    ensure_cache,
    normalize_regions,
    write_cache,
)
from msdn_tf.data.hdf5 import HDF5Features, write_feature_map_hdf5
from msdn_tf.data.pipeline import ClassBalancedSampler, RandomBatchSampler, eval_dataset, train_dataset
from msdn_tf.data.registry import load_dataset
from msdn_tf.errors import DataError
from tests.helpers import tiny_demo

TINY_DEMO = tiny_demo()

N, F, H, W = 37, 24, 3, 2


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    fmap = (np.maximum(rng.standard_normal((N, F, H, W)), 0) * 7).astype(np.float32)
    fmap[3, :, 0, 0] = 0.0  # an all-zero region stays zero
    labels = np.arange(N) % 4
    return write_feature_map_hdf5(
        tmp_path / "feats.hdf5",
        feature_map=fmap,
        labels=labels,
        trainval_loc=np.flatnonzero(labels < 2)[:-2],
        test_seen_loc=np.flatnonzero(labels < 2)[-2:],
        test_unseen_loc=np.flatnonzero(labels >= 2),
        att=rng.random((4, 5)),
        w2v_att=rng.random((5, 6)),
        compression="gzip",
    )


def test_cache_matches_hdf5_rows_after_normalisation(source, tmp_path):
    ref = normalize_regions(HDF5Features(source).read(np.arange(N)))
    assert np.all(ref[3, 0] == 0)
    np.testing.assert_allclose(np.linalg.norm(ref[0], axis=-1), 1.0, rtol=1e-6)
    for dtype, atol in (("float16", 2.0**-12), ("float32", 1e-7)):
        path = build_cache_from_hdf5(
            source, str(tmp_path / f"c_{dtype}.npy"), dtype=dtype, chunk_rows=5, progress=False
        )
        feats = MemmapFeatures(path)
        assert feats.shape == (N, H * W, F) and feats.dtype == np.dtype(dtype)
        got = feats.read(np.arange(N))
        assert got.dtype == np.float32
        assert np.max(np.abs(got - ref)) <= atol  # documented bound: half an fp16 ulp of values < 1
        # after the model's renormalisation the region vectors agree to < 5e-4 relative
        renorm = normalize_regions(got)
        err = np.linalg.norm(renorm - ref, axis=-1).max()
        assert err < (5e-4 if dtype == "float16" else 1e-6)
        side = json.load(open(path + ".json"))
        assert side["shape"] == [N, H * W, F] and side["dtype"] == dtype and side["normalized"]
        assert side["source"]["size"] == os.path.getsize(source)
        assert np.load(path, mmap_mode="r").shape == (N, H * W, F)  # a plain .npy file


def test_memmap_features_read_order_duplicates_and_modes(source, tmp_path):
    path = build_cache_from_hdf5(source, str(tmp_path / "c.npy"), progress=False)
    rows = np.array([30, 2, 30, 0, 17])  # unsorted, with a duplicate (class-balanced draws with replacement)
    a, b = MemmapFeatures(path), MemmapFeatures(path, mode="memmap")
    full = np.load(path)
    np.testing.assert_array_equal(a.read_native(rows), full[rows])
    np.testing.assert_array_equal(b.read_native(rows), full[rows])
    assert a.read_native(np.array([], np.int64)).shape == (0, H * W, F)
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(c.read(rows), a.read(rows))
    with pytest.raises(DataError, match=r"c.npy: row indices must be in \[0, 37\)"):
        a.read([N])


def test_stale_cache_is_detected_and_rebuilt(source, tmp_path):
    logs = []
    feats = ensure_cache(source, str(tmp_path / "cache"), progress=False, log=logs.append)
    path = feats.path
    assert path == cache_path_for(source, str(tmp_path / "cache")) and len(logs) == 1
    assert cache_status(path, source)[0]
    ensure_cache(source, str(tmp_path / "cache"), progress=False, log=logs.append)
    assert len(logs) == 1  # up to date: not rebuilt
    assert not cache_status(path, source, "float32")[0]
    # the source changes (same size, new content and mtime): stale
    st = os.stat(source)
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ok, reason = cache_status(path, source)
    assert not ok and "stale" in reason and "mtime_ns" in reason
    ensure_cache(source, str(tmp_path / "cache"), progress=False, log=logs.append)
    assert len(logs) == 2 and "stale" in logs[1] and cache_status(path, source)[0]
    # a missing or foreign sidecar: not used
    os.remove(path + ".json")
    assert "sidecar" in cache_status(path, source)[1]


def test_cache_is_never_half_written(source, tmp_path):
    out = tmp_path / "c.npy"
    good = build_cache_from_hdf5(source, str(out), progress=False)
    before = open(good, "rb").read()
    calls = []

    def failing(start, stop):
        calls.append(start)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return np.ones((stop - start, H * W, F), np.float32)

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_cache(str(out), (N, H * W, F), failing, chunk_rows=4, progress=False)
    assert open(good, "rb").read() == before and cache_status(str(out), source)[0]  # old cache intact
    assert sorted(os.listdir(tmp_path)) == ["c.npy", "c.npy.json", "feats.hdf5"]  # no temp file left
    fresh = tmp_path / "fresh.npy"
    with pytest.raises(RuntimeError):
        calls.clear()
        write_cache(str(fresh), (N, H * W, F), failing, chunk_rows=4, progress=False)
    assert not fresh.exists() and not (tmp_path / "fresh.npy.json").exists()
    # NaN in the source is refused
    with pytest.raises(DataError, match="NaN"):
        write_cache(str(fresh), (2, 1, 1), lambda a, b: np.full((b - a, 1, 1), np.nan), progress=False)
    assert not fresh.exists()


def test_truncated_or_foreign_cache_files_name_the_file(source, tmp_path):
    path = build_cache_from_hdf5(source, str(tmp_path / "c.npy"), progress=False)
    raw = open(path, "rb").read()
    bad = tmp_path / "truncated.npy"
    bad.write_bytes(raw[:-100])
    with pytest.raises(DataError, match="truncated.npy: the file has .* bytes .*truncated"):
        MemmapFeatures(str(bad))
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"definitely not numpy")
    with pytest.raises(DataError, match="junk.npy: not a readable .npy"):
        MemmapFeatures(str(junk))
    np.save(tmp_path / "twod.npy", np.zeros((3, 4), np.float16))
    with pytest.raises(DataError, match=r"twod.npy: the cache must be a C-ordered \(N, R, F\)"):
        MemmapFeatures(str(tmp_path / "twod.npy"))
    with pytest.raises(DataError, match="cache dtype must be"):
        cache_path_for(source, dtype="int8")
    with pytest.raises(DataError, match="nope.hdf5: feature file not found"):
        build_cache_from_hdf5(str(tmp_path / "nope.hdf5"))


def test_registry_cache_and_pipeline_read_float16(tmp_path):
    cfg = resolve_config("demo", overrides=["data.cache=true", f"data.data_dir={tmp_path}"])
    cfg.demo = TINY_DEMO
    data = load_dataset(cfg)
    assert isinstance(data.features, MemmapFeatures) and data.features.dtype == np.float16
    cfg.data.cache = False
    raw = load_dataset(cfg)
    rows = np.arange(len(raw.labels))
    np.testing.assert_allclose(data.features.read(rows), normalize_regions(raw.features.read(rows)), atol=2.0**-12)
    for sampler in (
        RandomBatchSampler(data.trainval_loc, 7, seed=0),
        ClassBalancedSampler(data.trainval_loc, data.labels, 7, seed=0),
    ):
        for parallel in (1, 3):
            batches = list(train_dataset(data, sampler, start_step=5, num_steps=4, parallel_reads=parallel))
            for i, (x, y) in enumerate(batches):
                want = sampler.batch(5 + i)
                assert x.dtype.name == "float32"
                np.testing.assert_array_equal(x.numpy(), data.features.read(want))
                np.testing.assert_array_equal(y.numpy(), data.labels[want])
    got = np.concatenate([x.numpy() for x in eval_dataset(data, data.test_unseen_loc, 4)])
    np.testing.assert_array_equal(got, data.features.read(data.test_unseen_loc))


def test_prepare_command_builds_then_reuses(tmp_path, capsys):
    from msdn_tf.cli import prepare

    tiny = [f"demo.{k}={v}" for k, v in TINY_DEMO.__dict__.items()]
    argv = ["--dataset", "demo", "--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    for s in tiny:
        argv += ["--set", s]
    assert prepare.main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        not first["was_up_to_date"]
        and first["dtype"] == "float16"
        and first["shape"][1:] == [TINY_DEMO.map_size**2, TINY_DEMO.feature_dim]
    )
    assert prepare.main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["was_up_to_date"] and again["cache"] == first["cache"]
    assert prepare.main(["--dataset", "cub", "--data-dir", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
