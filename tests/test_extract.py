"""Feature extraction: tiny backbones on a handful of generated images."""

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from msdn_tf.backbones import keras_resnet  # noqa: E402
from msdn_tf.cli import extract  # noqa: E402
from msdn_tf.data import extraction  # noqa: E402
from msdn_tf.data.hdf5 import load_feature_map_hdf5  # noqa: E402
from msdn_tf.errors import DataError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZES = [(50, 70, 3), (80, 40, 3), (64, 64, 1), (33, 90, 3), (100, 100, 3), (45, 46, 4)]
LABELS = np.array([0, 1, 0, 1, 2, 2])  # classes 0, 1 seen; 2 unseen
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    names = []
    for i, (h, w, c) in enumerate(SIZES):
        img = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        sub = root / f"class{LABELS[i]}"
        sub.mkdir(exist_ok=True)
        if c == 3 and i % 2 == 0:
            name = f"class{LABELS[i]}/im{i}.jpg"
            data = tf.io.encode_jpeg(img, quality=90)
        else:
            name = f"class{LABELS[i]}/im{i}.png"
            data = tf.io.encode_png(img)
        tf.io.write_file(str(root / name), data)
        names.append(name)
    return root, names


def tiny_model():
    """(B, 32, 32, 3) -> (B, 4, 4, 8), fixed weights."""
    inp = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(
        8,
        3,
        strides=8,
        padding="same",
        kernel_initializer=keras.initializers.RandomNormal(seed=1),
        bias_initializer="ones",
    )(inp)
    return keras.Model(inp, keras.layers.ReLU()(x))


class Counting:
    def __init__(self, model):
        self.model, self.calls, self.images = model, 0, 0

    def __call__(self, x):
        self.calls += 1
        self.images += int(x.shape[0])
        return self.model(x, training=False)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _metadata_files(folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    att = np.abs(np.random.default_rng(0).standard_normal((4, 3)))
    names = np.empty((3, 1), dtype=object)
    for i in range(3):
        names[i, 0] = np.array([f"class{i}"])
    col = lambda v: np.asarray(v, dtype=np.uint16).reshape(-1, 1)  # noqa: E731
    scipy.io.savemat(
        str(folder / "att_splits.mat"),
        {
            "att": att / np.linalg.norm(att, axis=0),
            "original_att": att,
            "allclasses_names": names,
            "trainval_loc": col([1, 2, 4]),
            "test_seen_loc": col([3]),
            "test_unseen_loc": col([5, 6]),
        },
    )
    with open(folder / "TOY_attribute.pkl", "wb") as fh:
        pickle.dump(np.random.default_rng(1).standard_normal((4, 300)), fh)
    np.savez(folder / "image_list.npz", labels=LABELS, image_files=np.array([]))  # replaced by caller
    return folder


def test_extract_writes_loadable_file(tmp_path, images, model):
    root, names = images
    meta_dir = _metadata_files(tmp_path / "meta")
    meta = extraction.build_metadata(
        LABELS,
        len(names),
        att_splits=str(meta_dir / "att_splits.mat"),
        attributes_pkl=str(meta_dir / "TOY_attribute.pkl"),
    )
    out = tmp_path / "features.hdf5"
    extraction.extract_features(
        names,
        out,
        backbone=model,
        images_root=str(root),
        batch_size=4,
        image_size=IMAGE_SIZE,
        metadata=meta,
        progress=False,
    )
    assert out.exists() and not Path(str(out) + ".partial").exists()
    data = load_feature_map_hdf5(str(out), name="toy")
    assert data.features.shape == (6, 16, 8) and data.features.map_shape == (4, 4)
    assert data.labels.tolist() == LABELS.tolist() and data.class_names == ["class0", "class1", "class2"]
    assert data.unseen_classes.tolist() == [2]
    with h5py.File(out, "r") as f:
        fmap = f["feature_map"][()]
        assert fmap.dtype == np.float32 and fmap.shape == (6, 8, 4, 4)
        assert f["feature_map"].compression == "gzip"
    # row i is image i, channel-first, through decode/resize/crop/preprocess_input
    img = keras_resnet.load_image(tf.constant(str(root / names[1])), IMAGE_SIZE)
    ref = model(keras.applications.resnet.preprocess_input(img[None]), training=False)
    np.testing.assert_allclose(fmap[1], np.transpose(np.asarray(ref)[0], (2, 0, 1)), rtol=1e-5, atol=1e-5)


def test_resize_and_centre_crop(tmp_path):
    # 40 x 80 image, left half 0, right half 200: shorter side -> 32, long side 64, crop columns 16..47
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 40:] = 200
    path = str(tmp_path / "crop.png")
    tf.io.write_file(path, tf.io.encode_png(img))
    out = keras_resnet.load_image(tf.constant(path), 32).numpy()
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out[:, :14], 0, atol=1e-3)
    np.testing.assert_allclose(out[:, 18:], 200, atol=1e-3)
    assert 0 < out[0, 16, 0] < 200  # the edge sits at the centre


def test_interrupted_run_resumes_identically(tmp_path, images, model):
    root, names = images
    full = tmp_path / "full.hdf5"
    extraction.extract_features(
        names, full, backbone=model, images_root=str(root), batch_size=2, image_size=IMAGE_SIZE, progress=False
    )

    class Stop(Exception):
        pass

    def stop_after_first(done):
        if done >= 2:
            raise Stop()

    out = tmp_path / "resumed.hdf5"
    partial = Path(str(out) + ".partial")
    first = Counting(model)
    with pytest.raises(Stop):
        extraction.extract_features(
            names,
            out,
            backbone=first,
            images_root=str(root),
            batch_size=2,
            image_size=IMAGE_SIZE,
            progress=False,
            after_batch=stop_after_first,
        )
    assert not out.exists() and partial.exists()
    assert first.images == 2
    with h5py.File(partial, "r") as f:
        assert int(f.attrs["done_count"]) == 2
    second = Counting(model)
    extraction.extract_features(
        names, out, backbone=second, images_root=str(root), batch_size=2, image_size=IMAGE_SIZE, progress=False
    )
    assert (second.calls, second.images) == (2, 4)  # done rows are not recomputed
    assert out.exists() and not partial.exists()
    with h5py.File(full, "r") as a, h5py.File(out, "r") as b:
        fa, fb = a["feature_map"][()], b["feature_map"][()]
    assert fa.tobytes() == fb.tobytes()
    # a partial from another job is refused, --restart discards it
    with pytest.raises(Stop):
        extraction.extract_features(
            names,
            tmp_path / "x.hdf5",
            backbone=model,
            images_root=str(root),
            batch_size=2,
            image_size=IMAGE_SIZE,
            progress=False,
            after_batch=stop_after_first,
        )
    with pytest.raises(DataError, match="different job"):
        extraction.extract_features(
            names[:5],
            tmp_path / "x.hdf5",
            backbone=model,
            images_root=str(root),
            batch_size=2,
            image_size=IMAGE_SIZE,
            progress=False,
        )
    extraction.extract_features(
        names[:5],
        tmp_path / "x.hdf5",
        backbone=model,
        images_root=str(root),
        batch_size=2,
        image_size=IMAGE_SIZE,
        progress=False,
        restart=True,
    )


def test_unreadable_and_missing_images(tmp_path, images, model):
    root, names = images
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 4)
    paths = [str(root / n) for n in names[:3]] + [str(bad)] + [str(root / names[4])]
    with pytest.raises(DataError, match="broken.jpg: cannot read or decode"):
        extraction.extract_features(
            paths, tmp_path / "o.hdf5", backbone=model, batch_size=2, image_size=IMAGE_SIZE, progress=False
        )
    assert not (tmp_path / "o.hdf5").exists()
    with pytest.raises(DataError, match="1 image.*not found.*nothere.png"):
        extraction.extract_features(
            names + ["nothere.png"],
            tmp_path / "m.hdf5",
            backbone=model,
            images_root=str(root),
            image_size=IMAGE_SIZE,
            progress=False,
        )


def test_image_lists_and_path_resolution(tmp_path, images):
    root, names = images
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    assert extraction.read_image_list(str(tmp_path / "list.txt")) == (names, None)
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{n},{lab}\n" for n, lab in zip(names, LABELS)))
    files, labels = extraction.read_image_list(str(tmp_path / "list.csv"))
    assert files == names and labels.tolist() == LABELS.tolist()
    # res101.mat stores absolute paths of another machine: leading parts are dropped
    cell = np.empty((6, 1), dtype=object)
    for i, n in enumerate(names):
        cell[i, 0] = np.array([f"/BS/xian/work/data/{n}"])
    scipy.io.savemat(str(tmp_path / "res101.mat"), {"image_files": cell, "labels": (LABELS + 1).reshape(-1, 1)})
    files, labels = extraction.read_image_list(str(tmp_path / "res101.mat"))
    assert labels.tolist() == LABELS.tolist()
    assert extraction.resolve_image_paths(str(root), files) == [os.path.join(str(root), n) for n in names]


def test_cli_resnet101_and_weights_errors(tmp_path, images, capsys):
    root, names = images
    meta = _metadata_files(tmp_path / "meta")
    np.savez(meta / "image_list.npz", labels=LABELS, image_files=np.array(names))
    out = tmp_path / "cli.hdf5"
    rc = extract.main(
        [
            "--images-root",
            str(root),
            "--image-list",
            str(meta / "image_list.npz"),
            "--out",
            str(out),
            "--backbone",
            "keras_resnet101",
            "--weights",
            "none",
            "--image-size",
            "64",
            "--batch-size",
            "3",
            "--compression",
            "none",
            "--att-splits",
            str(meta / "att_splits.mat"),
            "--attributes-pkl",
            str(meta / "TOY_attribute.pkl"),
            "--no-progress",
        ]
    )
    assert rc == 0
    data = load_feature_map_hdf5(str(out))
    assert data.features.shape == (6, 4, 2048) and data.w2v.shape == (4, 300)
    rc = extract.main(
        [
            "--images-root",
            str(root),
            "--image-list",
            str(meta / "image_list.npz"),
            "--out",
            str(tmp_path / "w.hdf5"),
            "--backbone",
            "keras_resnet101",
            "--weights",
            str(tmp_path / "absent.weights.h5"),
        ]
    )
    assert rc == 2
    assert "absent.weights.h5: weights file not found" in capsys.readouterr().err
    with pytest.raises(DataError, match="absent.h5: weights file not found"):
        keras_resnet.build_backbone(str(tmp_path / "absent.h5"), 64)
    help_text = extract._parser().format_help()
    assert "torchvision" in help_text and "TransZero" in help_text


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import keras
from msdn_tf.data import extraction
inp = keras.Input(({s}, {s}, 3))
x = keras.layers.Conv2D(8, 3, strides=8, padding="same", kernel_initializer=keras.initializers.RandomNormal(seed=1),
                        bias_initializer="ones")(inp)
model = keras.Model(inp, keras.layers.ReLU()(x))
kill = lambda done: os.kill(os.getpid(), signal.SIGKILL) if done >= 4 else None
extraction.extract_features({names!r}, {out!r}, backbone=model, images_root={root!r}, batch_size=2,
                         image_size={s}, progress=False, after_batch=kill)
"""


def test_killed_process_leaves_no_output(tmp_path, images, model):
    root, names = images
    out = tmp_path / "killed.hdf5"
    script = KILL_SCRIPT.format(repo=str(REPO), s=IMAGE_SIZE, names=names, out=str(out), root=str(root))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not out.exists()
    partial = Path(str(out) + ".partial")
    with h5py.File(partial, "r") as f:
        assert int(f.attrs["done_count"]) == 4
    resumed = Counting(model)
    extraction.extract_features(
        names, out, backbone=resumed, images_root=str(root), batch_size=2, image_size=IMAGE_SIZE, progress=False
    )
    assert resumed.images == 2
    full = tmp_path / "full.hdf5"
    extraction.extract_features(
        names, full, backbone=model, images_root=str(root), batch_size=2, image_size=IMAGE_SIZE, progress=False
    )
    with h5py.File(full, "r") as a, h5py.File(out, "r") as b:
        assert a["feature_map"][()].tobytes() == b["feature_map"][()].tobytes()
