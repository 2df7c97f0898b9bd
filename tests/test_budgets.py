"""Budgets of the readers of untrusted bytes outside the .pth reader and config YAML (issue 21 §4).

Each file here is small and declares (or inflates to) far more than it holds; each reader
must refuse it before the work, with one error naming the file and the limit.
(The .pth reader: tests/test_torch_checkpoint.py; config YAML: tests/test_config.py;
parsers under generated input: tests/test_properties.py.)
"""

import io
import json
import pickle
import tracemalloc
import zipfile

import h5py
import numpy as np
import pytest
import scipy.io

from msdn_tf import limits
from msdn_tf.data import custom, hdf5, wordvectors, xlsa17
from msdn_tf.errors import DataError, MSDNError
from msdn_tf.training.checkpoint import Checkpointer, load_arrays


def _npy(array_shape, dtype="<f8", data=b""):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": array_shape})
    return buf.getvalue() + data


def _deflated_npz(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return str(path)


@pytest.fixture
def peak_memory():
    tracemalloc.start()
    yield lambda: tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()


# --------------------------------------------------------------------------- npz


def test_compressed_npz_is_checked_before_inflating(tmp_path, peak_memory):
    # 64 MiB of zeros deflates to 64 KB; the image list's labels would inflate to it.
    zeros = _npy((8 << 20,), "<i8", bytes(64 << 20))
    path = _deflated_npz(tmp_path / "image_list.npz", {"labels.npy": zeros, "image_files.npy": zeros})
    weights = _deflated_npz(tmp_path / "step.weights.npz", {"arr_0.npy": zeros})
    del zeros
    tracemalloc.reset_peak()
    with pytest.raises(DataError, match=r"image_list.npz: member 'labels.npy' declares \d+ bytes .*ARRAY_RATIO"):
        xlsa17.load_image_list(path)
    assert peak_memory() < 8 << 20
    # The same for a checkpoint's weights file.
    with pytest.raises(DataError, match="ARRAY_RATIO"):
        load_arrays(weights)


def test_npz_header_declaring_more_than_stored(tmp_path):
    # A stored (not deflated) member whose header declares 2 GiB but holds nothing.
    path = tmp_path / "lie.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("arr_0.npy", _npy((1 << 28,)))
    with pytest.raises(DataError, match=r"member 'arr_0.npy' declares 2147483648 bytes of data but occupies \d+ bytes"):
        load_arrays(path)


def test_legal_npz_reads(tmp_path):
    path = tmp_path / "ok.npz"
    np.savez_compressed(path, np.arange(1000.0), np.ones((30, 30)))
    values = load_arrays(path)
    assert values[0].shape == (1000,) and values[1].shape == (30, 30)


# --------------------------------------------------------------------------- HDF5 and MATLAB


def test_hdf5_dataset_never_written_is_refused(tmp_path):
    # A 2 KB file declaring 1000 x 2048 x 14 x 14 float32 feature maps that were never
    # written: every read returns the fill value; a cache build would write 1.6 GB of it.
    path = tmp_path / "empty_maps.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("feature_map", shape=(1000, 2048, 14, 14), dtype="f4", chunks=(1, 2048, 14, 14))
        f.create_dataset("labels", shape=(50_000_000,), dtype="i8", chunks=(1 << 20,))
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"dataset '/feature_map' declares 1605632000 bytes of data but occupies 0"):
        hdf5.HDF5Features(str(path))
    with pytest.raises(DataError, match=r"dataset '/labels' declares 400000000 bytes"):
        hdf5._read_key(h5py.File(path, "r"), str(path), "labels")


def test_mat_v5_compressed_variable_is_checked_before_inflating(tmp_path, peak_memory):
    path = tmp_path / "att_splits.mat"
    scipy.io.savemat(path, {"att": np.zeros((4096, 4096))}, do_compression=True)  # 128 MiB as 130 KB
    tracemalloc.reset_peak()
    with pytest.raises(DataError, match=r"att_splits.mat: MATLAB file \(all its variables\) declares 134217728 bytes"):
        xlsa17._load_mat(str(path))
    assert peak_memory() < 4 << 20
    ok = tmp_path / "ok.mat"
    scipy.io.savemat(ok, {"att": np.ones((85, 50)), "names": np.array(["a", "b"], dtype=object)})
    assert xlsa17._mat_v5_arrays(str(ok)) == [("att", (85, 50), 6), ("names", (1, 2), 1)]
    assert xlsa17._load_mat(str(ok))["att"].shape == (85, 50)


def _cell_ladder(path, depth, width):
    """A MATLAB v7.3 file whose cell of ``width`` references points to another such cell, ``depth`` times."""
    with h5py.File(path, "w", userblock_size=512) as f:  # MATLAB's 128-byte header lives in the user block
        leaf = f.create_dataset("#refs#/leaf", data=np.zeros((1, 1)))
        leaf.attrs["MATLAB_class"] = np.bytes_("double")
        target = leaf
        for level in range(depth):
            cell = f.create_dataset(
                "#refs#/c%d" % level, data=np.array([target.ref] * width, dtype=h5py.ref_dtype).reshape(width, 1)
            )
            cell.attrs["MATLAB_class"] = np.bytes_("cell")
            target = cell
        f["top"] = target
        f["top"].attrs["MATLAB_class"] = np.bytes_("cell")
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file".ljust(116) + b"\0" * 8 + b"\x00\x02IM")


def test_mat_v73_cell_references_are_bounded(tmp_path, monkeypatch):
    deep = tmp_path / "deep.mat"
    _cell_ladder(deep, depth=12, width=1)
    with pytest.raises(DataError, match="cells nested deeper than 8 levels"):
        xlsa17._load_mat(str(deep))
    # Shared references expand exponentially (width ** depth): counted at each use.
    monkeypatch.setattr(xlsa17, "MAX_MAT_ELEMENTS", 1000)
    wide = tmp_path / "wide.mat"
    _cell_ladder(wide, depth=4, width=10)
    with pytest.raises(DataError, match=r"'/top' expands to more than 1000 elements|expands to more than 1000"):
        xlsa17._load_mat(str(wide))


# --------------------------------------------------------------------------- pickles and text


def test_attribute_vector_pickle_is_scanned_before_unpickling(tmp_path):
    path = tmp_path / "CUB_attribute.pkl"
    path.write_bytes(b"\x80\x02K\x01r\xff\xff\xff\x00.")  # memo index 2**24: 256 MB in CPython's unpickler
    with pytest.raises(DataError, match=r"not a plain numpy array pickle: byte \d+: memo index 16777215"):
        xlsa17.load_attribute_vectors(str(path))
    legal = tmp_path / "ok.pkl"
    legal.write_bytes(pickle.dumps(np.ones((3, 4)), protocol=2))
    assert xlsa17.load_attribute_vectors(str(legal)).shape == (3, 4)


def test_word_vector_lines_and_header_are_bounded(tmp_path):
    one_line = tmp_path / "oneline.txt"
    one_line.write_text("red " + "1 " * (1 << 20))  # 2 MiB without a line break
    with pytest.raises(DataError, match=r"line 1 is longer than 1048576 characters \(MAX_LINE_CHARS\)"):
        wordvectors.read_word_vectors(str(one_line), ["red"])
    header = tmp_path / "header.txt"
    header.write_text("1 100000000000\nblue 1 2\n")  # would allocate K x 1e11 float64
    with pytest.raises(DataError, match=r"line 1: the word2vec header gives dimension '100000000000'"):
        wordvectors.attribute_vectors(["red"], str(header), allow_missing_words=True, allow_zero_vectors=True)


def test_text_lists_are_size_checked_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_TEXT_BYTES", 100)
    big = tmp_path / "images.csv"
    big.write_text("path,class\n" + "a.jpg,cat\n" * 20)
    with pytest.raises(DataError, match=r"images.csv: image CSV of 211 bytes is over the limit of 100 bytes"):
        custom.read_image_csv(big)
    table = tmp_path / "classes.csv"
    table.write_text("class,red\n" + "cat,1\n" * 30)
    with pytest.raises(DataError, match=r"attribute table of \d+ bytes is over the limit of 100 bytes"):
        custom.read_attribute_table(table)


def test_unseen_yaml_alias_bomb_and_json_depth(tmp_path):
    bomb = tmp_path / "unseen.yaml"
    bomb.write_text(
        "unseen: ["
        + ", ".join("&a%d [%s]" % (i, ", ".join(["*a%d" % (i - 1)] * 9)) for i in range(1, 8)).replace("*a0", "x")
        + "]\n"
    )
    with pytest.raises(DataError, match="MAX_YAML_NODES"):
        custom.read_unseen_list(bomb)
    deep = tmp_path / "custom.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="custom.json: manifest is JSON nested too deeply"):
        custom.read_manifest(tmp_path)


def test_state_json_nested_too_deeply_is_one_error(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.dir.mkdir(parents=True)
    ckpt.state_path.write_text('{"step": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(MSDNError, match="corrupt checkpoint state"):
        ckpt.read_state()


def test_short_repr_is_bounded_for_shared_and_recursive_values():
    shared = ["x" * 10]
    for _ in range(60):  # 2**60 leaves if printed in full
        shared = [shared, shared]
    assert len(limits.short_repr(shared, 100)) < 140
    loop = []
    loop.append(loop)
    assert limits.short_repr(loop, 50).startswith("[[[[")
    assert limits.short_repr(10**5000) == "<integer of 16610 bits>"
    assert limits.short_text("a\nb") == "a\\nb"
    assert json.loads(json.dumps(limits.short_repr({"k": [1, 2]}))) == "{'k': [1, 2]}"


def test_keras_archive_declaring_huge_weights_is_refused_before_keras(tmp_path):
    # config.json of a real MSDN .keras with feature_dim and embed_dim raised to 8000:
    # Keras would create 4 x 8000 x 8000 float32 variables (1 GB) before reading the
    # 17 KB weights file. Checked from the archive alone (no Keras needed).
    config = {
        "module": "msdn_tf.model",
        "class_name": "MSDN",
        "registered_name": "msdn_tf>MSDN",
        "config": {"num_classes": 7, "num_attributes": 5, "feature_dim": 8000, "embed_dim": 8000},
    }
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", "{}")
        zf.writestr("config.json", json.dumps(config))
        zf.writestr("model.weights.h5", bytes(16932))
    with pytest.raises(DataError, match=r"the model \(MSDN C=7, K=5, F=8000, D=8000\) weights declares 1024160200"):
        limits.check_keras_archive(path)
    config["config"].update(feature_dim=10, embed_dim=4)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", json.dumps(config))
        zf.writestr("model.weights.h5", bytes(16932))
    limits.check_keras_archive(path)  # the real sizes pass
    config["config"]["embed_dim"] = True
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", json.dumps(config))
    with pytest.raises(DataError, match="must be positive integers below 2\\*\\*31"):
        limits.check_keras_archive(path)
