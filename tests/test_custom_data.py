"""Bring-your-own-data: format readers, word vectors (§1.3), validation, the registry entry, end to end."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from msdn_tf.data import custom, wordvectors
from msdn_tf.errors import DataError

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220)}
CLASSES = ["red_box", "green_box", "blue_box", "red_dot", "green_dot", "blue_dot"]
ATTRS = ["has_color::red", "has_color::green", "has_color::blue", "shape_(box)", "shape_(dot)"]
TINY = 32


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny images, tables, vectors written in the test


def _image(cls: str, i: int) -> np.ndarray:
    colour, shape = cls.split("_")
    img = np.full((TINY, TINY, 3), 235, np.uint8)
    lo = 4 + i % 4
    if shape == "box":
        img[lo : lo + 20, lo : lo + 20] = COLOURS.get(colour, (128, 0, 128))
    else:
        img[lo + 6 : lo + 12, lo + 6 : lo + 12] = COLOURS.get(colour, (128, 0, 128))
    return img


def write_images(root: Path, classes=CLASSES, per_class=4) -> Path:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_image(c, i)).save(root / c / f"{c}_{i}.png")
    return root


def write_table(path: Path, classes=CLASSES, attrs=ATTRS, rows=None) -> Path:
    lines = ["class," + ",".join(attrs)]
    for c in classes:
        if rows and c in rows:
            vals = rows[c]
        else:
            colour, shape = c.split("_")
            vals = [
                int(colour == "red"),
                int(colour == "green"),
                int(colour == "blue"),
                int(shape == "box"),
                int(shape == "dot"),
            ]
        lines.append(c + "," + ",".join(str(v) for v in vals))
    path.write_text("\n".join(lines) + "\n")
    return path


WORDS = {
    w: np.arange(1, 5, dtype=np.float64) * (k + 1)
    for k, w in enumerate(["has", "color", "red", "green", "blue", "shape", "box", "dot"])
}


def write_vectors(path: Path, header=True, words=WORDS, extra=50, gz=False) -> Path:
    lines = [f"{len(words) + extra} 4"] if header else []
    lines += [f"filler{i} " + " ".join("0.5" for _ in range(4)) for i in range(extra // 2)]
    lines += [w + " " + " ".join(f"{x:g}" for x in v) for w, v in words.items()]
    lines += [f"tail{i} 1 2 3 4" for i in range(extra - extra // 2)]
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture
def src(tmp_path):
    root = write_images(tmp_path / "images")
    table = write_table(tmp_path / "attributes.csv")
    unseen = tmp_path / "unseen.txt"
    unseen.write_text("# held out\nblue_dot\ngreen_box\n")
    vectors = write_vectors(tmp_path / "vectors.txt")
    return {"images": root, "attributes": table, "unseen": unseen, "vectors": vectors, "dir": tmp_path}


def tiny_backbone():
    """(B, 32, 32, 3) -> (B, 2, 2, 16), fixed weights."""
    import keras

    inp = keras.Input((TINY, TINY, 3))
    x = keras.layers.Conv2D(
        16,
        3,
        strides=16,
        padding="same",
        kernel_initializer=keras.initializers.RandomNormal(seed=3),
        bias_initializer="ones",
    )(inp)
    return keras.Model(inp, keras.layers.ReLU()(x))


def prepare(src, out, **kw):
    args = dict(
        images=str(src["images"]),
        attributes=str(src["attributes"]),
        unseen=str(src["unseen"]),
        word_vectors=str(src["vectors"]),
        image_size=TINY,
        batch_size=8,
        progress=False,
        log=lambda m: None,
    )
    args.update(kw)
    if "backbone" not in args:
        args["backbone"] = tiny_backbone()
    return custom.prepare_dataset(out, **args)


# ---------------------------------------------------------------------------------------------
# Word vectors


def test_attribute_words_cleaning():
    assert wordvectors.attribute_words("has_bill_shape::curved_(up_or_down)") == [
        "has",
        "bill",
        "shape",
        "curved",
        "up",
        "or",
        "down",
    ]
    assert wordvectors.attribute_words("Man-Made 2") == ["man", "made"]


@pytest.mark.parametrize("header,gz", [(True, False), (False, False), (True, True), (False, True)])
def test_word_vector_recipe_formats(tmp_path, header, gz):
    path = write_vectors(tmp_path / ("v.txt.gz" if gz else "v.txt"), header=header, gz=gz)
    vecs, report = wordvectors.attribute_vectors(["has_color::red", "shape_(dot)"], str(path))
    np.testing.assert_allclose(vecs[0], WORDS["has"] + WORDS["color"] + WORDS["red"])
    np.testing.assert_allclose(vecs[1], WORDS["shape"] + WORDS["dot"])
    assert report["format"] == ("word2vec" if header else "glove") and report["dim"] == 4
    assert report["missing_words"] == {} and report["zero_attributes"] == []


def test_word_vectors_stream_and_keep_only_needed(tmp_path):
    path = write_vectors(tmp_path / "v.txt", extra=2000)
    found, info = wordvectors.read_word_vectors(str(path), ["red", "dot"])
    assert set(found) == {"red", "dot"}
    # all wanted words found exactly: reading stops there, before the 1000 tail lines
    assert info["lines"] < 1100
    # case-insensitive fallback when only a capitalised entry exists; exact match wins
    path2 = tmp_path / "case.txt"
    path2.write_text("Red 1 1\nBlue 2 2\nblue 3 3\n")
    found, _ = wordvectors.read_word_vectors(str(path2), ["red", "blue"])
    np.testing.assert_allclose(found["red"], [1, 1])
    np.testing.assert_allclose(found["blue"], [3, 3])


def test_missing_words_reported(tmp_path):
    path = write_vectors(tmp_path / "v.txt")
    names = ["has_color::purple", "stripes_only"]
    with pytest.raises(DataError, match="'purple'.*'stripes'|'only'.*'purple'"):
        wordvectors.attribute_vectors(names, str(path))
    warnings = []
    with pytest.raises(DataError, match="all-zero.*stripes_only"):
        wordvectors.attribute_vectors(names, str(path), allow_missing_words=True, warn=warnings.append)
    vecs, report = wordvectors.attribute_vectors(
        names, str(path), allow_missing_words=True, allow_zero_vectors=True, warn=warnings.append
    )
    assert set(report["missing_words"]) == {"purple", "stripes", "only"}
    assert report["missing_words"]["purple"] == ["has_color::purple"]
    assert report["zero_attributes"] == ["stripes_only"] and not vecs[1].any()
    np.testing.assert_allclose(vecs[0], WORDS["has"] + WORDS["color"])
    assert any("purple" in w for w in warnings) and any("all-zero" in w for w in warnings)


def test_malformed_word_vector_files(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("2 3\nred 1 2\nblue 1 2 3\n")
    with pytest.raises(DataError, match="bad.txt: line 2 .*'red'.* 2 numbers, expected 3"):
        wordvectors.read_word_vectors(str(bad), ["red"])
    binary = tmp_path / "bin.bin"
    binary.write_bytes(b"2 3\nred \xff\xfe\x00\x01\x80\x81\n")
    with pytest.raises(DataError, match="binary word2vec"):
        wordvectors.read_word_vectors(str(binary), ["red"])
    with pytest.raises(DataError, match="not found"):
        wordvectors.read_word_vectors(str(tmp_path / "absent.txt"), ["red"])


# ---------------------------------------------------------------------------------------------
# Format readers


def test_read_class_folders(src):
    entries = custom.read_image_folder(src["images"])
    assert len(entries) == 24
    assert [e.cls for e in entries[:4]] == ["blue_box"] * 4  # sorted class folders
    assert all(Path(e.path).is_absolute() for e in entries)


def test_read_csv_forms(src, tmp_path):
    with_header = tmp_path / "list.csv"
    with_header.write_text(
        "image,label\nimages/red_box/red_box_0.png,red_box\nimages/blue_dot/blue_dot_1.png,blue_dot\n"
    )
    entries = custom.read_image_csv(with_header)
    assert [e.cls for e in entries] == ["red_box", "blue_dot"]
    assert Path(entries[0].path) == (src["images"] / "red_box" / "red_box_0.png").resolve()
    bare = tmp_path / "sub" / "bare.csv"
    bare.parent.mkdir()
    bare.write_text("red_box/red_box_0.png,red_box,trainval\nblue_dot/blue_dot_1.png,blue_dot,test_unseen\n")
    entries = custom.read_image_csv(bare, images_root=src["images"])
    assert [e.split for e in entries] == ["trainval", "test_unseen"]
    assert Path(entries[1].path).is_file()
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("path,class,split\na.png,red_box,training\n")
    with pytest.raises(DataError, match=r"wrong.csv: line 2: split 'training'"):
        custom.read_image_csv(wrong)


def test_attribute_table_and_vectors_given(src, tmp_path):
    table = custom.read_attribute_table(src["attributes"], warn=lambda m: None)
    assert table.class_names == CLASSES and table.attribute_names == ATTRS and table.values.shape == (6, 5)
    npy = tmp_path / "v.npy"
    np.save(npy, np.ones((5, 7)))
    assert custom.read_attribute_vectors_file(npy, ATTRS).shape == (5, 7)
    named = tmp_path / "v.csv"
    named.write_text("attribute,d0,d1\n" + "\n".join(f"{a},{i},{-i}" for i, a in reversed(list(enumerate(ATTRS)))))
    np.testing.assert_allclose(custom.read_attribute_vectors_file(named, ATTRS)[:, 0], np.arange(5))
    with pytest.raises(DataError, match=r"must be \(K=5, D\)"):
        np.save(npy, np.ones((4, 7)))
        custom.read_attribute_vectors_file(npy, ATTRS)


# ---------------------------------------------------------------------------------------------
# Validation errors (each names the file and the offending class/attribute/row)


def test_table_errors_and_warnings(tmp_path):
    nan = write_table(tmp_path / "nan.csv", rows={"red_dot": [1, 0, "nan", 0, 1]})
    with pytest.raises(DataError, match=r"nan.csv: line 5, class 'red_dot', attribute 'has_color::blue'.*NaN"):
        custom.read_attribute_table(nan)
    empty = write_table(tmp_path / "empty.csv", rows={"red_dot": [1, 0, "", 0, 1]})
    with pytest.raises(DataError, match="empty.csv: line 5.*missing"):
        custom.read_attribute_table(empty)
    text = write_table(tmp_path / "text.csv", rows={"red_box": [1, 0, "yes", 0, 1]})
    with pytest.raises(DataError, match="'yes' is not a number"):
        custom.read_attribute_table(text)
    dup = write_table(tmp_path / "dup.csv", classes=CLASSES + ["red_box"])
    with pytest.raises(DataError, match=r"dup.csv: line 8: class 'red_box' is listed twice \(first at line 2\)"):
        custom.read_attribute_table(dup)
    dup_attr = write_table(tmp_path / "dupattr.csv", attrs=ATTRS[:4] + [ATTRS[0]])
    with pytest.raises(DataError, match="duplicated attribute names.*has_color::red"):
        custom.read_attribute_table(dup_attr)
    const = write_table(
        tmp_path / "const.csv",
        attrs=ATTRS + ["always"],
        rows={
            c: [int(c.startswith(k)) for k in ("red", "green", "blue")]
            + [int(c.endswith("box")), int(c.endswith("dot")), 1]
            for c in CLASSES
        },
    )
    warnings = []
    custom.read_attribute_table(const, warn=warnings.append)
    assert any("constant" in w and "'always'" in w for w in warnings)


def test_class_matching_errors(src, tmp_path):
    table = custom.read_attribute_table(src["attributes"], warn=lambda m: None)
    entries = custom.read_image_folder(src["images"])
    write_images(src["images"], classes=["purple_box"], per_class=1)
    with pytest.raises(DataError, match="not in the attribute table.*'purple_box'.*purple_box_0.png"):
        custom.match_classes(custom.read_image_folder(src["images"]), table, str(src["images"]))
    lonely = write_table(tmp_path / "more.csv", classes=CLASSES + ["red_cone"], rows={"red_cone": [1, 0, 0, 0, 0]})
    with pytest.raises(DataError, match=r"more.csv: 1 class\(es\) of the attribute table have no images.*'red_cone'"):
        custom.match_classes(entries, custom.read_attribute_table(lonely, warn=lambda m: None), "imgs")


def test_unseen_errors(src, tmp_path):
    table = custom.read_attribute_table(src["attributes"], warn=lambda m: None)
    bad = tmp_path / "u.txt"
    bad.write_text("blue_dott\n")
    with pytest.raises(
        DataError,
        match=r"u.txt: unseen class\(es\) not in the attribute table.*'blue_dott'.*"
        r"did you mean 'blue_dot'",
    ):
        custom.resolve_unseen(table, custom.read_unseen_list(bad), str(bad))
    with pytest.raises(DataError, match="all 6 classes are unseen"):
        custom.resolve_unseen(table, CLASSES, "all.txt")
    empty = tmp_path / "none.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(DataError, match="no unseen classes"):
        custom.resolve_unseen(table, custom.read_unseen_list(empty), str(empty))
    with pytest.raises(DataError, match="gives 0 unseen"):
        custom.choose_unseen(CLASSES, 0.01, 0)
    assert len(custom.choose_unseen(CLASSES, 0.34, 0)) == 2
    yml = tmp_path / "u.yaml"
    yml.write_text("unseen: [blue_dot, red_box]\n")
    assert custom.read_unseen_list(yml) == ["blue_dot", "red_box"]


def test_split_column_unseen_class_with_training_images(src, tmp_path):
    rows = ["path,class,split"]
    for c in CLASSES:
        for i in range(4):
            split = "test_unseen" if c == "blue_dot" else ("test_seen" if i == 0 else "trainval")
            rows.append(f"{c}/{c}_{i}.png,{c},{split}")
    rows.append("blue_dot/blue_dot_0.png,blue_dot,trainval")
    listing = tmp_path / "list.csv"
    listing.write_text("\n".join(rows) + "\n")
    with pytest.raises(
        DataError,
        match=r"list.csv:26: class 'blue_dot' has test_unseen images, so it is unseen, "
        r"but this row puts its image .* in trainval",
    ):
        prepare(
            src,
            tmp_path / "out",
            images=None,
            csv_file=str(listing),
            images_root=str(src["images"]),
            unseen=None,
            backbone=None,
        )
    listing.write_text("\n".join(rows[:-1]) + "\n")
    manifest = prepare(
        src, tmp_path / "out", images=None, csv_file=str(listing), images_root=str(src["images"]), unseen=None
    )
    assert manifest["unseen_classes"] == ["blue_dot"] and manifest["sizes"]["test_seen_loc"] == 5


def test_unreadable_image_and_missing_words(src, tmp_path):
    (src["images"] / "red_box" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        prepare(src, tmp_path / "a", backbone=None)
    # a PNG header with a broken body passes the quick check; the extractor names the image
    good = (src["images"] / "red_box" / "red_box_0.png").read_bytes()
    (src["images"] / "red_box" / "broken.png").write_bytes(good[:40])
    with pytest.raises(DataError, match="broken.png: cannot read or decode"):
        prepare(src, tmp_path / "a")
    (src["images"] / "red_box" / "broken.png").unlink()
    vectors = write_vectors(tmp_path / "few.txt", words={k: v for k, v in WORDS.items() if k != "dot"})
    with pytest.raises(DataError, match="few.txt: 1 of 8 attribute words.*'dot' \\(in shape_\\(dot\\)\\)"):
        prepare(src, tmp_path / "b", word_vectors=str(vectors), backbone=None)
    assert not (tmp_path / "b" / "features.hdf5").exists()  # validated before any extraction


# ---------------------------------------------------------------------------------------------
# Prepared folder, registry entry, end to end


def test_prepare_and_load_through_registry(src, tmp_path):
    import h5py

    from msdn_tf.config import resolve_config
    from msdn_tf.data.registry import DATASETS, load_dataset

    assert "custom" in DATASETS
    out = tmp_path / "data"
    manifest = prepare(src, out, val_fraction=0.25, seed=3)
    assert manifest["sizes"]["images"] == 24 and manifest["unseen_classes"] == ["green_box", "blue_dot"]
    with h5py.File(out / "features.hdf5", "r") as f:
        assert f["feature_map"].shape == (24, 16, 2, 2)
        np.testing.assert_allclose(f["w2v_att"][3], WORDS["shape"] + WORDS["box"])
    config = resolve_config("custom", overrides=[f"data.data_dir={out}"])
    data = load_dataset(config)
    assert data.name == "custom" and data.class_names == CLASSES and data.attribute_names == ATTRS
    assert [data.class_names[i] for i in data.unseen_classes] == ["green_box", "blue_dot"]
    s = data.summary()
    assert (s["trainval"], s["test_seen"], s["test_unseen"], s["regions"], s["channels"]) == (12, 4, 8, 4, 16)
    np.testing.assert_allclose(np.linalg.norm(data.att, axis=1), 1.0, rtol=1e-6)
    assert data.val_loc.size and not set(data.labels[data.val_loc]) & set(data.labels[data.train_loc])
    # the same seed gives the same splits
    again = prepare(src, tmp_path / "data2", val_fraction=0.25, seed=3)
    assert again["sizes"] == manifest["sizes"]
    with h5py.File(out / "features.hdf5", "r") as f1, h5py.File(tmp_path / "data2" / "features.hdf5", "r") as f2:
        np.testing.assert_array_equal(f1["test_seen_loc"][()], f2["test_seen_loc"][()])
    config.data.data_dir = str(tmp_path / "absent")
    with pytest.raises(DataError, match="custom prepare"):
        load_dataset(config)


def test_spec_yaml_options(tmp_path):
    from msdn_tf.cli.custom import build_parser
    from msdn_tf.experiments.custom_workflow import prepare_options

    spec = tmp_path / "dataset.yaml"
    spec.write_text("images: imgs\nattributes: a.csv\nunseen_fraction: 0.3\nword_vectors: v.txt.gz\nseed: 4\n")
    args = build_parser().parse_args(["prepare", "--spec", str(spec), "--out", "x", "--seed", "9"])
    opts = prepare_options(vars(args), args.spec)
    assert opts["images"] == str(tmp_path / "imgs") and opts["unseen_fraction"] == 0.3 and opts["seed"] == 9
    assert opts["weights"] == "imagenet" and opts["csv_file"] is None
    # a flag replaces the spec's choice of the same group (here: --unseen instead of unseen_fraction)
    args = build_parser().parse_args(
        ["prepare", "--spec", str(spec), "--out", "x", "--unseen", "u.txt", "--csv", "l.csv"]
    )
    opts = prepare_options(vars(args), args.spec)
    assert opts["unseen"] == "u.txt" and opts["unseen_fraction"] is None
    assert opts["csv_file"] == "l.csv" and opts["images"] is None
    spec.write_text("imagez: x\n")
    with pytest.raises(Exception, match="unknown key 'imagez'"):
        prepare_options({}, spec)


@pytest.mark.slow
def test_end_to_end_prepare_train_evaluate_export_serve(src, tmp_path):
    from msdn_tf.experiments.custom_workflow import query_local_server, run_custom

    data_dir = tmp_path / "data"
    prepare(src, data_dir)
    summary = run_custom(
        data_dir,
        tmp_path / "run",
        overrides=["train.iterations=4", "train.eval_every=2", "data.batch_size=8", "train.verbose=0"],
        export_dir=tmp_path / "export",
        top_k=2,
        verify_export=True,
        log=lambda m: None,
    )
    assert summary["train"]["step"] == 4
    assert summary["export_check_ok"] is True  # checked before it was published
    assert summary["evaluate"]["protocol"] == "final" and 0.0 <= summary["evaluate"]["acc"] <= 1.0
    run = tmp_path / "run"
    assert (run / "model.keras").is_file() and (run / "eval" / "metrics.json").is_file()
    assert json.loads((run / "metadata.json").read_text())["class_names"] == CLASSES
    # injected backbone: features-only export, queried through the local gRPC test double
    assert summary["signatures"] == ["serving_default", "serving_maps", "metadata"]
    assert (tmp_path / "export" / "1" / "saved_model.pb").is_file()
    answer = query_local_server(summary["export_dir"], data_dir, top_k=2, log=lambda m: None)["summary"]
    assert answer["signature"] == "serving_default" and answer["queries"] == 2
    assert all(len(a["top_k"]) == 2 and set(a["top_k"]) <= set(CLASSES) for a in answer["answers"])


def test_shapes_example_source_passes_the_readers(tmp_path):
    from msdn_tf.experiments.custom_workflow import make_shapes_dataset

    src = make_shapes_dataset(tmp_path, num_classes=12, num_unseen=3, images_per_class=2, size=64, seed=1)
    table = custom.read_attribute_table(src["attributes"], warn=lambda m: None)
    entries = custom.read_image_folder(src["images"])
    labels = custom.match_classes(entries, table, src["images"])
    unseen = custom.resolve_unseen(table, custom.read_unseen_list(src["unseen"]), src["unseen"])
    custom.check_image_files(entries)
    assert len(entries) == 24 and len(unseen) == 3 and np.bincount(labels).tolist() == [2] * 12
    seen_rows = np.delete(table.values, unseen, axis=0)
    assert np.all(seen_rows.sum(axis=0) > 0)  # every attribute of an unseen class occurs among the seen ones
    vecs, report = wordvectors.attribute_vectors(table.attribute_names, src["word_vectors"])
    assert vecs.shape == (9, 50) and report["format"] == "word2vec" and not report["missing_words"]
