"""The tensorflow-datasets builder ``msdn_zsl``: built from manual files in a tmp dir."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from msdn_tf.data import tfds_builder  # noqa: E402,F401  (registers msdn_zsl)
from msdn_tf.data.cache import normalize_regions  # noqa: E402
from msdn_tf.data.demo import ensure_demo_file  # noqa: E402
from msdn_tf.data.hdf5 import load_feature_map_hdf5  # noqa: E402
from tests.helpers import tiny_demo  # noqa: E402

TINY_DEMO = tiny_demo()


def test_tfds_load_demo_splits_and_metadata(tmp_path):
    manual = tmp_path / "manual"
    path = ensure_demo_file(TINY_DEMO, manual)
    data = load_feature_map_hdf5(path, name="demo")
    splits, info = tfds.load(
        "msdn_zsl/demo",
        data_dir=str(tmp_path / "tfds"),
        with_info=True,
        shuffle_files=False,
        download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(manual_dir=str(manual))},
    )
    assert set(splits) == {"trainval", "test_seen", "test_unseen", "train", "val"}
    for split in ("trainval", "test_seen", "test_unseen"):
        loc = getattr(data, f"{split}_loc")
        assert info.splits[split].num_examples == len(loc)
        examples = list(tfds.as_numpy(splits[split]))
        labels = sorted(int(e["label"]) for e in examples)
        assert labels == sorted(data.labels[loc].tolist())
    # one example matches the source row after per-region normalisation
    rows = data.trainval_loc
    want = normalize_regions(data.features.read(rows))
    got = np.stack([e["feature_map"] for e in tfds.as_numpy(splits["trainval"])])
    assert got.shape == want.shape and got.dtype == np.float32
    # TFDS may reorder examples within a split: match them by content
    order = [int(np.argmin(np.abs(want - g).sum(axis=(1, 2)))) for g in got]
    assert sorted(order) == list(range(len(rows)))
    np.testing.assert_allclose(got, want[order], atol=1e-6)
    md = info.metadata
    assert md["class_names"] == data.class_names and md["attribute_names"] == data.attribute_names
    assert md["seen_classes"] == data.seen_classes.tolist()
    assert md["unseen_classes"] == data.unseen_classes.tolist()
    np.testing.assert_allclose(np.asarray(md["att"]), data.att, atol=1e-6)
    np.testing.assert_allclose(np.asarray(md["w2v"]), data.w2v, atol=1e-5)
    # a second load reads the prepared copy (metadata restored from disk)
    builder = tfds.builder("msdn_zsl/demo", data_dir=str(tmp_path / "tfds"))
    assert builder.info.metadata["unseen_classes"] == data.unseen_classes.tolist()


def test_tfds_builder_configs():
    names = [c.name for c in tfds_builder.MsdnZsl.BUILDER_CONFIGS]
    assert names == ["demo", "cub", "sun", "awa2"]
    assert "msdn_zsl" in tfds.list_builders()
