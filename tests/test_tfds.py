"""The tensorflow-datasets builder ``msdn_zsl``: TFDS' own builder test case on generated dummy data,
ClassLabel names, static shapes, description and citations, and the demo read in place (no copy)."""

import tempfile

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from msdn_tf.config import DemoConfig  # noqa: E402
from msdn_tf.data import tfds_builder  # noqa: E402  (registers msdn_zsl)
from msdn_tf.data.cache import normalize_regions  # noqa: E402
from msdn_tf.data.demo import ensure_demo_file  # noqa: E402
from msdn_tf.data.hdf5 import load_feature_map_hdf5  # noqa: E402

# The default demo's shapes (49 regions x 256 channels, 40 classes; the msdn_zsl/demo config), few images.
SMALL_DEMO = DemoConfig(images_per_class=3)


def _manual(folder):
    return {"download_config": tfds.download.DownloadConfig(manual_dir=str(folder))}


class MsdnZslDemoTest(tfds.testing.DatasetBuilderTestCase):
    """TFDS' builder test case on a generated demo file as the manual folder (no download)."""

    DATASET_CLASS = tfds_builder.MsdnZsl
    BUILDER_CONFIG_NAMES_TO_TEST = ["demo"]
    OVERLAPPING_SPLITS = ["trainval"]  # train and val are its class-disjoint parts
    SKIP_CHECKSUMS = True  # nothing is downloaded

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        data = load_feature_map_hdf5(ensure_demo_file(SMALL_DEMO, cls._tmp.name), name="demo")
        cls.EXAMPLE_DIR = cls._tmp.name
        cls.SPLITS = {s: len(getattr(data, f"{s}_loc")) for s in tfds_builder.SPLITS}
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls._tmp.cleanup()


def test_tfds_load_demo_splits_labels_and_metadata(tmp_path):
    manual = tmp_path / "manual"
    data = load_feature_map_hdf5(ensure_demo_file(SMALL_DEMO, manual), name="demo")
    splits, info = tfds.load(
        "msdn_zsl/demo",
        data_dir=str(tmp_path / "tfds"),
        with_info=True,
        shuffle_files=False,
        download_and_prepare_kwargs=_manual(manual),
    )
    assert set(splits) == {"trainval", "test_seen", "test_unseen", "train", "val"}
    label = info.features["label"]
    assert isinstance(label, tfds.features.ClassLabel) and label.names == data.class_names
    assert info.features["feature_map"].shape == (49, 256)
    assert splits["trainval"].element_spec["feature_map"].shape == (49, 256)
    for split in ("trainval", "test_seen", "test_unseen"):
        loc = getattr(data, f"{split}_loc")
        assert info.splits[split].num_examples == len(loc)
        labels = sorted(int(e["label"]) for e in tfds.as_numpy(splits[split]))
        assert labels == sorted(data.labels[loc].tolist())
    # the examples match the source rows after per-region normalisation
    rows = data.trainval_loc
    want = normalize_regions(data.features.read(rows))
    got = np.stack([e["feature_map"] for e in tfds.as_numpy(splits["trainval"])])
    assert got.shape == want.shape and got.dtype == np.float32
    order = [int(np.argmin(np.abs(want - g).sum(axis=(1, 2)))) for g in got]  # TFDS may reorder examples
    assert sorted(order) == list(range(len(rows)))
    np.testing.assert_allclose(got, want[order], atol=1e-6)
    md = info.metadata
    assert md["attribute_names"] == data.attribute_names
    assert md["seen_classes"] == data.seen_classes.tolist() and md["unseen_classes"] == data.unseen_classes.tolist()
    np.testing.assert_allclose(np.asarray(md["att"]), data.att, atol=1e-6)
    np.testing.assert_allclose(np.asarray(md["w2v"]), data.w2v, atol=1e-5)
    # a second load reads the prepared copy: names and metadata restored from disk
    builder = tfds.builder("msdn_zsl/demo", data_dir=str(tmp_path / "tfds"))
    assert builder.info.features["label"].names == data.class_names
    assert builder.info.metadata["unseen_classes"] == data.unseen_classes.tolist()


@pytest.mark.parametrize("name,classes,cites", [("cub", 200, "wah2011cub"), ("sun", 717, "patterson2012sun")])
def test_benchmark_configs_have_static_shapes_class_labels_and_citations(tmp_path, name, classes, cites):
    info = tfds.builder(f"msdn_zsl/{name}", data_dir=str(tmp_path)).info
    assert info.features["feature_map"].shape == (196, 2048)
    assert info.features["label"].num_classes == classes
    assert "xlsa17" in info.description and "chen2022msdn" in info.citation and cites in info.citation
    assert "xian2019zsl" in info.citation


def test_a_demo_file_of_other_shapes_is_refused_naming_the_file(tmp_path):
    manual = tmp_path / "manual"
    path = ensure_demo_file(DemoConfig(num_classes=6, num_unseen=2, images_per_class=3, map_size=3), manual)
    with pytest.raises(ValueError, match=rf"{path.name}.*msdn_zsl/demo holds .*\(49, 256, 40\).*\(9, 256, 6\)"):
        tfds.load("msdn_zsl/demo", data_dir=str(tmp_path / "tfds"), download_and_prepare_kwargs=_manual(manual))


def test_the_demo_is_read_in_place_not_copied_into_the_manual_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tfds_builder, "DemoConfig", lambda: SMALL_DEMO)
    manual = tmp_path / "empty"
    manual.mkdir()
    splits = tfds.load("msdn_zsl/demo", data_dir=str(tmp_path / "tfds"), download_and_prepare_kwargs=_manual(manual))
    assert len(list(splits["trainval"])) > 0
    assert not list(manual.iterdir())  # nothing written into the manual folder
    assert list((tmp_path / "cache").rglob("demo_*.hdf5"))  # the demo file msdn-tf trains on


def test_tfds_builder_configs():
    names = [c.name for c in tfds_builder.MsdnZsl.BUILDER_CONFIGS]
    assert names == ["demo", "cub", "sun", "awa2"]
    assert "msdn_zsl" in tfds.list_builders()
