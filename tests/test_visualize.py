"""Attention figures, projector embeddings and TensorBoard hooks (msdn_tf.visualize, msdn_tf.viz)."""

import dataclasses
import json

import numpy as np
import pytest

from tests.helpers import tiny_demo

TINY_DEMO = tiny_demo()

K_TINY = TINY_DEMO.num_attributes


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory (config.yaml + model.keras) of a tiny demo model with random non-zero weights."""
    from msdn_tf.config import resolve_config, save_config
    from msdn_tf.data.registry import load_dataset
    from msdn_tf.training.loop import build_model_from_config

    root = tmp_path_factory.mktemp("viz")
    config = resolve_config("demo", overrides=[f"data.data_dir={root / 'data'}"])
    config.demo = dataclasses.replace(TINY_DEMO)
    data = load_dataset(config)
    model = build_model_from_config(config, data)
    rng = np.random.default_rng(0)
    for w in model.trainable_weights:
        if w.name.startswith("W_"):  # W_1, W_2, W_1_1, W_2_1 (W_1_1 and W_2_1 start at 0)
            w.assign(rng.normal(scale=0.7, size=w.shape).astype("float32"))
    run_dir = root / "run"
    run_dir.mkdir()
    save_config(config, run_dir / "config.yaml")
    model.save(run_dir / "model.keras")
    return {"dir": run_dir, "config": config, "data": data, "model": model}


def png_shape(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape


# --------------------------------------------------------------------------- attention numerics
def test_attention_maps_sum_to_one_over_the_right_axis(tiny_run):
    from msdn_tf.viz.attention import select_attention

    model, data = tiny_run["model"], tiny_run["data"]
    x = data.features.read(data.test_unseen_loc[:4])
    out = model(x)
    a2v, v2a = np.asarray(out["attention_a2v"]), np.asarray(out["attention_v2a"])  # (B, K, R)
    np.testing.assert_allclose(a2v.sum(axis=2), 1.0, atol=1e-5)  # each attribute over regions
    np.testing.assert_allclose(v2a.sum(axis=1), 1.0, atol=1e-5)  # each region over attributes
    assert v2a.std() > 1e-3 and a2v.std() > 1e-3  # random weights: neither is uniform

    sel = select_attention(out, model.fusion_weights, top_k=3, rank_by="fused")
    w1, w2 = model.fusion_weights
    fused = w1 * np.asarray(out["scores_a2v"]) + w2 * np.asarray(out["scores_v2a"])
    np.testing.assert_array_equal(sel["indices"], np.argsort(-fused, axis=1)[:, :3])
    np.testing.assert_allclose(sel["score"], np.sort(fused, axis=1)[:, ::-1][:, :3], rtol=1e-5)
    for b in range(4):
        np.testing.assert_allclose(sel["a2v"][b], a2v[b, sel["indices"][b]], rtol=1e-6)
        np.testing.assert_allclose(sel["v2a_raw"][b], v2a[b, sel["indices"][b]], rtol=1e-6)
    np.testing.assert_allclose(sel["a2v"].sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(sel["v2a"].sum(axis=-1), 1.0, atol=1e-5)  # renormalised for display
    assert not np.allclose(sel["v2a_raw"].sum(axis=-1), 1.0)  # ...which the raw maps are not

    by_a2v = select_attention(out, model.fusion_weights, top_k=2, rank_by="a2v")
    np.testing.assert_array_equal(by_a2v["indices"], np.argsort(-np.asarray(out["scores_a2v"]), axis=1)[:, :2])


def test_upsample_is_bilinear_and_keeps_the_range():
    from msdn_tf.viz.attention import upsample

    maps = np.array([[[0.0, 1.0], [0.0, 1.0]]], "float32")  # (1, 2, 2): left 0, right 1
    up = upsample(maps, (8, 8))
    assert up.shape == (1, 8, 8)
    assert up.min() >= 0.0 and up.max() <= 1.0
    assert np.all(np.diff(up[0, 0]) >= 0) and 0.0 < up[0, 0, 3] < 1.0  # smooth ramp, not nearest


def test_figures_are_drawn_headless_on_the_agg_canvas(tiny_run):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from msdn_tf.viz.attention import explain, figure_size, render_attention
    from msdn_tf.viz.common import Names, figure_to_array

    data = tiny_run["data"]
    expl = explain(tiny_run["model"], data.features.read(data.test_seen_loc[:1]), Names.from_data(data), top_k=2)[0]
    assert expl.a2v.shape == expl.v2a.shape == (2, 3, 3)
    fig = render_attention(expl)
    assert isinstance(fig.canvas, FigureCanvasAgg)
    assert figure_to_array(fig).shape == figure_size(2)[::-1] + (3,) == (520, 600, 3)


# --------------------------------------------------------------------------- attention command
def test_attention_from_dataset_index_writes_figure_and_json(tiny_run, tmp_path, capsys):
    from msdn_tf.cli import visualize
    from msdn_tf.viz.attention import figure_size

    out = tmp_path / "fig.png"
    rc = visualize.main(
        [
            "attention",
            "--run",
            str(tiny_run["dir"]),
            "--index",
            "1",
            "--split",
            "test_seen",
            "--top-k",
            "3",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert rc == 0
    width, height = figure_size(3)
    assert png_shape(out)[:2] == (height, width) == (2 * 230 + 60, 4 * 200)
    summary = json.loads((tmp_path / "fig.json").read_text())
    assert json.loads(capsys.readouterr().out) == summary
    # Without --json: a short readable summary (the JSON stays beside the figure).
    argv = ["attention", "--run", str(tiny_run["dir"]), "--index", "1", "--split", "test_seen", "--top-k", "3"]
    assert visualize.main(argv + ["--out", str(tmp_path / "fig2.png")]) == 0
    text = capsys.readouterr().out
    assert not text.lstrip().startswith("{") and len(text.splitlines()) == 3 + 3 + 1
    assert text.startswith(f"predicted: {summary['predicted_class']['name']}")
    assert f"1. {summary['top_attributes'][0]['name']}" in text and "fig2.json" in text
    data = tiny_run["data"]
    row = int(data.test_seen_loc[1])
    assert summary["row"] == row and summary["region_grid"] == [3, 3]
    assert summary["true_class"]["name"] == data.class_names[data.labels[row]]
    assert summary["true_class"]["seen"] is True
    assert summary["predicted_class"]["name"] in data.class_names
    attrs = summary["top_attributes"]
    assert [a["rank"] for a in attrs] == [1, 2, 3]
    scores = [a["score"] for a in attrs]
    assert scores == sorted(scores, reverse=True)
    w1, w2 = tiny_run["model"].fusion_weights
    for a in attrs:
        assert a["name"] == data.attribute_names[a["id"]]
        assert a["score_fused"] == pytest.approx(w1 * a["score_a2v"] + w2 * a["score_v2a"], rel=1e-4, abs=1e-6)


def tiny_backbone(channels):
    import keras

    return keras.Sequential(
        [keras.Input((48, 48, 3)), keras.layers.Conv2D(channels, 16, strides=16, activation="relu")]
    )


def test_attention_from_image_with_a_tiny_backbone(tiny_run, tmp_path):
    import matplotlib.image

    from msdn_tf.errors import MSDNError
    from msdn_tf.viz.attention import figure_size
    from msdn_tf.viz.run_figures import visualize_attention

    image = tmp_path / "bird.png"
    matplotlib.image.imsave(image, np.random.default_rng(0).random((60, 50, 3)))
    out = tmp_path / "img.png"
    summary = visualize_attention(
        tiny_run["dir"],
        image=image,
        backbone=tiny_backbone(TINY_DEMO.feature_dim),
        image_size=48,
        top_k=2,
        out=out,
        true_class="0",
        log=lambda m: None,
    )
    assert summary["region_grid"] == [3, 3] and summary["image"] == str(image)
    assert summary["true_class"]["id"] == 0 and len(summary["top_attributes"]) == 2
    assert png_shape(out)[:2] == figure_size(2)[::-1]
    with pytest.raises(
        MSDNError, match=f"backbone gives 8 channels per region but the model .* expects {TINY_DEMO.feature_dim}"
    ):
        visualize_attention(
            tiny_run["dir"],
            image=image,
            backbone=tiny_backbone(8),
            image_size=48,
            out=tmp_path / "x.png",
            log=lambda m: None,
        )
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(MSDNError, match="broken.jpg: cannot read or decode"):
        visualize_attention(
            tiny_run["dir"],
            image=broken,
            backbone=tiny_backbone(16),
            image_size=48,
            out=tmp_path / "y.png",
            log=lambda m: None,
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["attention", "--index", "999", "--split", "test_unseen"],
            "--index 999 is out of range: split 'test_unseen' has",
        ),
        (["attention", "--index", "0", "--split", "val"], "unknown split 'val'"),
        (["attention", "--image", "/nonexistent/bird.jpg"], "/nonexistent/bird.jpg: image not found"),
        (["attention", "--image", "x.jpg", "--true-class", "no such class"], "x.jpg: image not found"),
        (["embeddings", "--split", "val"], "unknown split 'val'"),
        (["embeddings", "--max-per-class", "0"], "--max-per-class must be >= 1"),
        (["attention", "--index", "0", "--run", "{not_a_run}"], "not a run directory (no config.yaml)"),
    ],
)
def test_bad_inputs_give_clear_errors(tiny_run, tmp_path, capsys, args, message):
    from msdn_tf.cli import visualize

    run = [] if "--run" in args else ["--run", str(tiny_run["dir"])]
    argv = [a.replace("{not_a_run}", str(tmp_path)) for a in args[:1] + run + args[1:]]
    rc = visualize.main(argv + ["--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


# --------------------------------------------------------------------------- embeddings
def test_embeddings_write_projector_files_tensorboard_can_load(tiny_run, tmp_path, capsys):
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorboard.plugins.projector import ProjectorConfig

    from msdn_tf.cli import visualize
    from msdn_tf.viz.embeddings import FIGURE_PX

    out = tmp_path / "proj"
    rc = visualize.main(
        [
            "embeddings",
            "--run",
            str(tiny_run["dir"]),
            "--max-per-class",
            "2",
            "--out",
            str(out),
            "--no-progress",
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    data = tiny_run["data"]
    test = np.concatenate([data.test_seen_loc, data.test_unseen_loc])
    n = int(np.minimum(np.bincount(data.labels[test]), 2).sum())  # at most 2 per class
    assert n < test.size
    assert summary["images"] == n and summary["dimension"] == K_TINY

    config = text_format.Parse((out / "projector_config.pbtxt").read_text(), ProjectorConfig())
    assert len(config.embeddings) == 1
    emb = config.embeddings[0]
    lines = (out / emb.metadata_path).read_text().splitlines()
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    assert header[:3] == ["class", "split", "seen"] and len(rows) == n
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(out)))  # as TensorBoard finds it
    tensor = reader.get_tensor(emb.tensor_name)
    assert tensor.shape == (n, K_TINY)
    for row, meta in zip(tensor[:3], rows[:3]):  # rows line up with the model's fused scores
        r = int(meta[-1])
        assert meta[0] == data.class_names[data.labels[r]]
        res = tiny_run["model"](data.features.read([r]))
        w1, w2 = tiny_run["model"].fusion_weights
        np.testing.assert_allclose(
            row, w1 * np.asarray(res["scores_a2v"][0]) + w2 * np.asarray(res["scores_v2a"][0]), rtol=1e-4, atol=1e-6
        )
    assert {m[2] for m in rows} == {"seen", "unseen"}
    assert list(out.glob("events.out.tfevents.*"))  # a run when --logdir is a parent folder
    # TensorBoard's projector plugin itself finds the config, checkpoint and tensor (private API, TB 2.21).
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector import projector_plugin

    plugin = projector_plugin.ProjectorPlugin(base_plugin.TBContext(logdir=str(out), data_provider=None))
    plugin._update_configs()
    assert list(plugin._configs["."].embeddings[0].tensor_shape) == [n, K_TINY]
    assert summary["projection"].startswith("t-SNE") or summary["projection"].startswith("PCA")
    assert png_shape(summary["figure"])[:2] == FIGURE_PX[::-1]


def test_embeddings_fall_back_to_pca_without_scikit_learn(tiny_run, tmp_path, monkeypatch):
    from msdn_tf.viz import embeddings
    from msdn_tf.viz.common import Names

    def no_sklearn():
        raise ImportError("No module named 'sklearn'")

    monkeypatch.setattr(embeddings, "_import_tsne", no_sklearn)
    logged = []
    summary = embeddings.embed_split(
        tiny_run["model"],
        tiny_run["data"],
        Names.from_data(tiny_run["data"]),
        tmp_path,
        split="test_unseen",
        progress=False,
        log=logged.append,
    )
    assert summary["projection"].startswith("PCA (scikit-learn not installed")
    assert summary["figure"].endswith("pca.png") and png_shape(summary["figure"])[:2] == embeddings.FIGURE_PX[::-1]
    assert any("scikit-learn is not installed" in m for m in logged)


# --------------------------------------------------------------------------- TensorBoard hooks
def test_tensorboard_hooks_write_images_histograms_and_scalars(tiny_run, tmp_path):
    import tensorflow as tf

    from msdn_tf.evaluation.predict import evaluate_model
    from msdn_tf.viz.tensorboard import (
        ATTENTION_TAG,
        HISTOGRAM_TAGS,
        SCALAR_TAGS,
        TEXT_TAG,
        make_eval_hooks,
        seen_unseen_confusion,
    )

    model, data, config = tiny_run["model"], tiny_run["data"], tiny_run["config"]
    metrics = evaluate_model(model, data, return_logits=True)
    writer = tf.summary.create_file_writer(str(tmp_path))
    hooks = make_eval_hooks(config, data, num_examples=3)
    for hook in hooks:
        hook(model=model, data=data, step=7, metrics=metrics, writer=writer)
    writer.close()

    found = {}
    for path in tmp_path.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                found[value.tag] = (event.step, value.metadata.plugin_data.plugin_name, value)
    assert found[ATTENTION_TAG][1] == "images"
    image_tensor = tf.make_ndarray(found[ATTENTION_TAG][2].tensor)
    assert image_tensor.shape == (2 + 3,)  # width, height, then 3 encoded PNGs
    for tag in HISTOGRAM_TAGS:
        assert found[tag][1] == "histograms"
    assert found[TEXT_TAG][1] == "text"
    assert all(step == 7 for step, _, _ in found.values())

    logits = metrics["_logits"]
    seen = np.asarray(data.seen_classes)
    expected_u2s = np.mean(np.isin(logits["unseen"]["logits"].argmax(1), seen))
    expected_s2u = np.mean(~np.isin(logits["seen"]["logits"].argmax(1), seen))
    got = {tag: float(tf.make_ndarray(found[tag][2].tensor)) for tag in SCALAR_TAGS}
    assert found[SCALAR_TAGS[0]][1] == "scalars"
    assert got["gzsl/unseen_predicted_seen"] == pytest.approx(expected_u2s)
    assert got["gzsl/seen_predicted_unseen"] == pytest.approx(expected_s2u)
    conf = seen_unseen_confusion(logits, data.seen_classes, data.unseen_classes)
    assert sum(map(sum, conf["counts"])) == len(data.test_seen_loc) + len(data.test_unseen_loc)


def test_seen_unseen_confusion_on_hand_made_logits():
    from msdn_tf.viz.tensorboard import confusion_markdown, seen_unseen_confusion

    eye = np.eye(4)
    logits = {"seen": {"logits": eye[[0, 1, 3, 3]]}, "unseen": {"logits": eye[[2, 0, 3, 1]]}}
    conf = seen_unseen_confusion(logits, seen_classes=[0, 1], unseen_classes=[2, 3])
    assert conf["counts"] == [[2, 2], [2, 2]]
    assert conf["seen_predicted_unseen"] == 0.5 and conf["unseen_predicted_seen"] == 0.5
    assert "| seen (test_seen) | 2 | 2 (50.0%) |" in confusion_markdown(conf)
