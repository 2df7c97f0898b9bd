"""Readers of the xlsa17 metadata: real CUB/SUN/AWA2 files and broken/synthetic ones."""

import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from msdn_tf.data import xlsa17
from msdn_tf.data.base import validate
from msdn_tf.errors import DataError

# ---------------------------------------------------------------------------------------------
# Real metadata (not in the repository; CI provides ../shared)


def _shared_zsl() -> Path:
    env = os.environ.get("MSDN_SHARED_DATA")
    if env:
        p = Path(env)
        return p / "zsl" if (p / "zsl").is_dir() else p
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zsl"


@pytest.fixture(scope="module")
def zsl_dir() -> Path:
    p = _shared_zsl()
    if not (p / "CUB" / "att_splits.mat").exists():
        pytest.skip(f"real zsl metadata not found at {p}; CI provides ../shared")
    return p


class ZeroFeatures:
    """A FeatureSource with N images but tiny maps (R=1, F=2)."""

    def __init__(self, n):
        self.shape = (n, 1, 2)

    def read(self, indices):
        return np.zeros((len(indices), 1, 2), np.float32)


# dataset: (images, K, C, seen, unseen, trainval, test_seen, test_unseen, names file)
TABLE = {
    "cub": (11788, 312, 200, 150, 50, 7057, 1764, 2967, "attributes.txt"),
    "sun": (14340, 102, 717, 645, 72, 10320, 2580, 1440, "attributes.mat"),
    "awa2": (37322, 85, 50, 40, 10, 23527, 5882, 7913, "predicates.txt"),
}


@pytest.mark.parametrize("name", ["cub", "sun", "awa2"])
def test_real_metadata(zsl_dir, name):
    n, k, c, n_seen, n_unseen, n_tv, n_ts, n_tu, names_file = TABLE[name]
    folder = zsl_dir / xlsa17.DATASET_DIRS[name]
    splits = xlsa17.load_att_splits(folder / "att_splits.mat", num_images=n)
    assert splits["att"].shape == (c, k) and splits["original_att"].shape == (c, k)
    assert len(splits["allclasses_names"]) == c
    assert (len(splits["trainval_loc"]), len(splits["test_seen_loc"]), len(splits["test_unseen_loc"])) == (
        n_tv,
        n_ts,
        n_tu,
    )
    assert min(splits[key].min() for key in xlsa17.SPLIT_KEYS) >= 0
    assert max(splits[key].max() for key in xlsa17.SPLIT_KEYS) < n
    # xlsa17 'att' columns are L2-normalised: rows after the transpose
    np.testing.assert_allclose(np.linalg.norm(splits["att"], axis=1), 1.0, atol=1e-6)

    images = xlsa17.load_image_list(folder / "image_list.npz")
    assert len(images["image_files"]) == n and images["labels"].shape == (n,)

    w2v = xlsa17.load_attribute_vectors(folder / f"{name.upper()}_attribute.pkl")
    assert w2v.shape == (k, 300) and w2v.dtype == np.float64
    if name == "sun":
        assert np.all(w2v[88] == 0) and np.count_nonzero(np.all(w2v == 0, axis=1)) == 1
    names = xlsa17.load_attribute_names(folder / names_file)
    assert len(names) == k and all(names)

    data = xlsa17.load_xlsa17_dataset(zsl_dir, name, ZeroFeatures(n))
    validate(data)
    s = data.summary()
    assert (s["images"], s["attributes"], s["classes"]) == (n, k, c)
    assert (s["seen_classes"], s["unseen_classes"]) == (n_seen, n_unseen)
    assert (s["trainval"], s["test_seen"], s["test_unseen"]) == (n_tv, n_ts, n_tu)
    assert data.attribute_names == names
    np.testing.assert_allclose(np.linalg.norm(data.att, axis=1), 1.0, atol=1e-5)
    # train/val: CUB's come from sent_splits.mat; all are class-disjoint and inside trainval
    assert data.train_loc is not None and data.val_loc is not None
    assert np.isin(np.concatenate([data.train_loc, data.val_loc]), data.trainval_loc).all()
    assert not np.intersect1d(data.labels[data.train_loc], data.labels[data.val_loc]).size
    if name == "awa2":
        assert splits["att"].min() < 0 and data.att.min() >= 0  # §1.4: AWA2 clipped at 0


def test_real_cub_train_val_from_sent_splits(zsl_dir):
    folder = zsl_dir / "CUB"
    splits = xlsa17.load_att_splits(folder / "att_splits.mat")
    assert splits["train_loc"] is None and splits["val_loc"] is None
    tv = xlsa17.load_train_val_splits(folder / "sent_splits.mat", 11788, splits["trainval_loc"])
    assert len(tv["train_loc"]) + len(tv["val_loc"]) == 7057 + 1764  # all seen-class images
    data = xlsa17.load_xlsa17_dataset(folder, "cub", ZeroFeatures(11788), train_val="none")
    assert data.train_loc is None and data.val_loc is None


# ---------------------------------------------------------------------------------------------
# Synthetic files

C, K, N = 5, 4, 20
LABELS = np.array([0, 1, 2] * 4 + [3, 4] * 4)  # 0-based; classes 3, 4 unseen
TRAINVAL = np.arange(0, 9)
TEST_SEEN = np.arange(9, 12)
TEST_UNSEEN = np.arange(12, 20)


def _cell(strings):
    out = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        out[i, 0] = np.array([s])
    return out


def _col(one_based):
    return np.asarray(one_based, dtype=np.uint16).reshape(-1, 1)


def write_att_splits(path, drop=(), **override):
    rng = np.random.default_rng(0)
    att = rng.random((K, C))
    mat = {
        "att": att / np.linalg.norm(att, axis=0, keepdims=True),
        "original_att": att * 100,
        "allclasses_names": _cell([f"class{i}" for i in range(C)]),
        "trainval_loc": _col(TRAINVAL + 1),
        "test_seen_loc": _col(TEST_SEEN + 1),
        "test_unseen_loc": _col(TEST_UNSEEN + 1),
    }
    mat.update(override)
    for key in drop:
        mat.pop(key)
    scipy.io.savemat(str(path), mat)
    return path


def write_dataset(folder, labels=LABELS, **splits_override):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_att_splits(folder / "att_splits.mat", **splits_override)
    scipy.io.savemat(
        str(folder / "res101.mat"),
        {
            "image_files": _cell([f"/BS/xian/data/images/img{i:02d}.jpg" for i in range(len(labels))]),
            "labels": _col(np.asarray(labels) + 1),
            "features": np.arange(8 * len(labels), dtype=np.float64).reshape(8, len(labels)),
        },
    )
    with open(folder / "TOY_attribute.pkl", "wb") as fh:
        pickle.dump(np.random.default_rng(1).standard_normal((K, 300)), fh, protocol=3)
    (folder / "attributes.txt").write_text("".join(f"{i + 1} has_part::value_{i}\n" for i in range(K)))
    return folder


def test_synthetic_dataset_res101(tmp_path):
    folder = write_dataset(tmp_path / "TOY")
    res = xlsa17.load_res101(folder / "res101.mat")
    assert res["labels"].tolist() == LABELS.tolist()
    assert res["image_files"][3] == "/BS/xian/data/images/img03.jpg" and "features" not in res
    feats = xlsa17.load_res101(folder / "res101.mat", features=True)["features"]
    assert feats.shape == (N, 8) and feats[1, 0] == 1.0
    data = xlsa17.load_xlsa17_dataset(tmp_path, "toy", ZeroFeatures(N))
    assert data.labels.tolist() == LABELS.tolist()
    assert data.trainval_loc.tolist() == TRAINVAL.tolist()
    assert data.seen_classes.tolist() == [0, 1, 2] and data.unseen_classes.tolist() == [3, 4]
    assert data.attribute_names[1] == "has_part::value_1" and data.class_names[4] == "class4"
    assert data.train_loc is None


def test_train_val_restricted_to_trainval(tmp_path):
    # like the xlsa17 files: train/val cover trainval + test_seen, class-disjoint
    train = np.flatnonzero(np.isin(LABELS, [0, 1]) & (np.arange(N) < 12))
    val = np.flatnonzero((LABELS == 2) & (np.arange(N) < 12))
    folder = write_dataset(tmp_path / "TOY", train_loc=_col(train + 1), val_loc=_col(val + 1))
    data = xlsa17.load_xlsa17_dataset(folder, "toy", ZeroFeatures(N))
    assert data.train_loc.tolist() == [i for i in train if i < 9]
    assert data.val_loc.tolist() == [i for i in val if i < 9]
    with pytest.raises(DataError, match="outside 'trainval_loc'"):
        xlsa17.load_xlsa17_dataset(folder, "toy", ZeroFeatures(N), train_val="raw")


def _write_v73(path):
    """A MATLAB v7.3 (HDF5) att_splits.mat, laid out as MATLAB writes it."""
    rng = np.random.default_rng(0)
    att = rng.random((K, C))
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("att", data=att.T).attrs["MATLAB_class"] = np.bytes_("double")
        f.create_dataset("original_att", data=(att * 100).T).attrs["MATLAB_class"] = np.bytes_("double")
        refs = f.create_group("#refs#")
        ref_list = []
        for i in range(C):
            d = refs.create_dataset(f"n{i}", data=np.array([[ord(ch)] for ch in f"class{i}"], dtype=np.uint16))
            d.attrs["MATLAB_class"] = np.bytes_("char")
            ref_list.append(d.ref)
        cell = f.create_dataset("allclasses_names", data=np.array([ref_list], dtype=h5py.ref_dtype))
        cell.attrs["MATLAB_class"] = np.bytes_("cell")
        for key, loc in (("trainval_loc", TRAINVAL), ("test_seen_loc", TEST_SEEN), ("test_unseen_loc", TEST_UNSEEN)):
            f.create_dataset(key, data=(loc + 1).reshape(1, -1).astype(np.float64))
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116, b" ") + b"\0" * 8 + b"\x00\x02IM"
    with open(path, "r+b") as fh:
        fh.write(header)
    return path


def test_matlab_v73_fallback(tmp_path):
    path = _write_v73(tmp_path / "att_splits.mat")
    with pytest.raises(NotImplementedError):
        scipy.io.loadmat(str(path))
    splits = xlsa17.load_att_splits(path, num_images=N)
    np.testing.assert_array_equal(splits["att"], np.random.default_rng(0).random((K, C)).T)
    assert splits["allclasses_names"] == [f"class{i}" for i in range(C)]
    assert splits["trainval_loc"].tolist() == TRAINVAL.tolist()


def test_truncated_mat(tmp_path):
    good = write_att_splits(tmp_path / "good.mat")
    raw = good.read_bytes()
    bad = tmp_path / "att_splits_truncated.mat"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="att_splits_truncated.mat"):
        xlsa17.load_att_splits(bad)
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"\x01\x02not a mat file at all" * 10)
    with pytest.raises(DataError, match="garbage.mat"):
        xlsa17.load_att_splits(garbage)
    with pytest.raises(DataError, match="nope.mat.*not found"):
        xlsa17.load_att_splits(tmp_path / "nope.mat")


def test_mat_missing_key(tmp_path):
    path = write_att_splits(tmp_path / "att_splits.mat", drop=("test_unseen_loc",))
    with pytest.raises(DataError, match=r"att_splits.mat: missing key 'test_unseen_loc'"):
        xlsa17.load_att_splits(path)


def test_mat_bad_shapes_and_indices(tmp_path):
    path = write_att_splits(tmp_path / "a.mat", att=np.ones((C, C + 1)))
    with pytest.raises(DataError, match=r"a.mat: 'att' must be"):
        xlsa17.load_att_splits(path)
    path = write_att_splits(tmp_path / "b.mat", trainval_loc=_col([0, 1, 2]))
    with pytest.raises(DataError, match=r"b.mat: 'trainval_loc' holds index 0.*1-based"):
        xlsa17.load_att_splits(path)
    path = write_att_splits(tmp_path / "c.mat", test_seen_loc=_col([10, N + 1]))
    with pytest.raises(DataError, match=rf"c.mat: 'test_seen_loc' holds index {N + 1}"):
        xlsa17.load_att_splits(path, num_images=N)
    xlsa17.load_att_splits(path)  # N unknown: no upper bound


def test_pickle_reduce_refused_not_executed(tmp_path):
    marker = tmp_path / "side_effect"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "EVIL_attribute.pkl"
    path.write_bytes(pickle.dumps(Evil(), protocol=3))
    with pytest.raises(DataError, match=r"EVIL_attribute.pkl: refused .*system"):
        xlsa17.load_attribute_vectors(path)
    assert not marker.exists()
    # _codecs.encode is admitted only as encode(str, "latin1") (protocol <= 2 bytes)
    import codecs

    class Codec:
        def __reduce__(self):
            return (codecs.encode, ("abc", "rot13"))

    path3 = tmp_path / "c_attribute.pkl"
    path3.write_bytes(pickle.dumps(Codec(), protocol=3))
    with pytest.raises(DataError, match="c_attribute.pkl: cannot unpickle"):
        xlsa17.load_attribute_vectors(path3)
    # an array inside a container that needs another global is refused too
    path2 = tmp_path / "b_attribute.pkl"
    path2.write_bytes(pickle.dumps({"a": np.arange(3.0), "f": np.random.default_rng}, protocol=3))
    with pytest.raises(DataError, match="b_attribute.pkl: refused"):
        xlsa17.load_attribute_vectors(path2)


def test_attribute_vector_formats(tmp_path):
    arr = np.random.default_rng(0).standard_normal((K, 300))
    for proto in (2, 3, 4, 5):
        p = tmp_path / f"p{proto}.pkl"
        p.write_bytes(pickle.dumps(arr, protocol=proto))
        np.testing.assert_array_equal(xlsa17.load_attribute_vectors(p), arr)
    np.save(tmp_path / "w.npy", arr)
    np.testing.assert_array_equal(xlsa17.load_attribute_vectors(tmp_path / "w.npy"), arr)
    np.save(tmp_path / "o.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="o.npy"):
        xlsa17.load_attribute_vectors(tmp_path / "o.npy")
    (tmp_path / "i.pkl").write_bytes(pickle.dumps(np.arange(6).reshape(2, 3)))
    with pytest.raises(DataError, match="i.pkl: expected a non-empty 2-D float"):
        xlsa17.load_attribute_vectors(tmp_path / "i.pkl")
    (tmp_path / "l.pkl").write_bytes(pickle.dumps([1.0, 2.0]))
    with pytest.raises(DataError, match="l.pkl: expected a numpy array"):
        xlsa17.load_attribute_vectors(tmp_path / "l.pkl")
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(arr)[:100])
    with pytest.raises(DataError, match="t.pkl"):
        xlsa17.load_attribute_vectors(tmp_path / "t.pkl")


def test_attribute_name_formats(tmp_path):
    (tmp_path / "attributes.txt").write_text("1 has_bill_shape::curved_(up_or_down)\n2 has_bill_shape::dagger\n")
    assert xlsa17.load_attribute_names(tmp_path / "attributes.txt") == [
        "has_bill_shape::curved_(up_or_down)",
        "has_bill_shape::dagger",
    ]
    (tmp_path / "predicates.txt").write_text("1\tblack\n2\twhite\n\n")
    assert xlsa17.load_attribute_names(tmp_path / "predicates.txt") == ["black", "white"]
    (tmp_path / "plain.txt").write_text("man-made\n3d shape\nsailing/ boating\n")
    assert xlsa17.load_attribute_names(tmp_path / "plain.txt") == ["man-made", "3d shape", "sailing/ boating"]
    scipy.io.savemat(str(tmp_path / "attributes.mat"), {"attributes": _cell(["sailing/ boating", "driving"])})
    assert xlsa17.load_attribute_names(tmp_path / "attributes.mat") == ["sailing/ boating", "driving"]
    scipy.io.savemat(str(tmp_path / "other.mat"), {"x": 1.0, "y": 2.0})
    with pytest.raises(DataError, match="other.mat: missing key 'attributes'"):
        xlsa17.load_attribute_names(tmp_path / "other.mat")


def test_labels_out_of_range(tmp_path):
    labels = LABELS.copy()
    labels[5] = C  # one past the last class
    folder = write_dataset(tmp_path / "TOY")
    np.savez(folder / "image_list.npz", labels=labels, image_files=np.array([f"i{i}.jpg" for i in range(N)]))
    with pytest.raises(DataError, match=r"image_list.npz: 'labels' must be class ids in \[0, 5\)"):
        xlsa17.load_xlsa17_dataset(folder, "toy", ZeroFeatures(N))


def test_unseen_class_in_trainval(tmp_path):
    folder = write_dataset(
        tmp_path / "TOY", trainval_loc=_col(np.r_[TRAINVAL, 12] + 1), test_unseen_loc=_col(TEST_UNSEEN[1:] + 1)
    )
    with pytest.raises(DataError, match=r"att_splits.mat: seen and unseen classes overlap.*'trainval_loc'"):
        xlsa17.load_xlsa17_dataset(folder, "toy", ZeroFeatures(N))


def test_overlapping_seen_unseen(tmp_path):
    # a seen-class image (not in trainval) listed as unseen test image
    folder = write_dataset(
        tmp_path / "TOY", test_seen_loc=_col(TEST_SEEN[1:] + 1), test_unseen_loc=_col(np.r_[TEST_UNSEEN, 9] + 1)
    )
    with pytest.raises(DataError, match=r"att_splits.mat: seen and unseen classes overlap.*'test_unseen_loc'"):
        xlsa17.load_xlsa17_dataset(folder, "toy", ZeroFeatures(N))
    folder = write_dataset(tmp_path / "TOY2", test_seen_loc=_col(np.r_[TEST_SEEN, 3] + 1))
    with pytest.raises(DataError, match=r"att_splits.mat: 'trainval_loc' and 'test_seen_loc' share 1"):
        xlsa17.load_xlsa17_dataset(folder, "toy", ZeroFeatures(N))


def test_mismatched_sizes(tmp_path):
    folder = write_dataset(tmp_path / "TOY")
    with pytest.raises(DataError, match=r"feature source has 19 images but the image list .*res101.mat has 20"):
        xlsa17.load_xlsa17_dataset(folder, "toy", ZeroFeatures(N - 1))
    (folder / "attributes.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match=r"attributes.txt: 3 attribute names but 'att'"):
        xlsa17.load_xlsa17_dataset(folder, "toy", ZeroFeatures(N))
    folder = write_dataset(tmp_path / "T2")
    with open(folder / "TOY_attribute.pkl", "wb") as fh:
        pickle.dump(np.zeros((K + 1, 300)), fh)
    with pytest.raises(DataError, match=r"TOY_attribute.pkl: word vectors must be \(4, D\)"):
        xlsa17.load_xlsa17_dataset(folder, "toy", ZeroFeatures(N))
    folder = write_dataset(tmp_path / "T3", labels=LABELS[:-2])
    with pytest.raises(DataError, match=r"att_splits.mat: 'test_unseen_loc' holds index 20 but there are only 18"):
        xlsa17.load_xlsa17_dataset(folder, "toy", ZeroFeatures(N - 2))
