"""The Keras model and losses against an independent NumPy implementation of the reference (§3, §4)."""

import numpy as np
import pytest

from msdn_tf import losses as L
from msdn_tf.model import MSDN, build_msdn
from tests import reference_numpy as ref
from tests.helpers import tiny_problem

RTOL = 1e-5


def make_model(p, **options):
    C, K = p["att"].shape
    F = p["W_1"].shape[1]
    options.setdefault("bias", p["bias"])
    model = build_msdn(p["att"], p["V"], p["seen"], p["unseen"], feature_dim=F, **options)
    # Random non-zero values for every weight (V is set verbatim, not normalised).
    model.embedding.V.assign(p["V"].astype("float32"))
    model.a2v.W_1.assign(p["W_1"].astype("float32"))
    model.a2v.W_2.assign(p["W_2"].astype("float32"))
    model.v2a.W_1_1.assign(p["W_1_1"].astype("float32"))
    model.v2a.W_2_1.assign(p["W_2_1"].astype("float32"))
    return model


def channel_last(fmap_bfr):
    return np.transpose(fmap_bfr, (0, 2, 1)).astype("float32")


def reference(p, **kw):
    kw.setdefault("bias", p["bias"])
    kw.setdefault("mask_bias", p["mask_bias"])
    return ref.forward(p["fmap_bfr"], p["V"], p["W_1"], p["W_2"], p["W_1_1"], p["W_2_1"], p["att"], **kw)


@pytest.mark.parametrize("normalize_V", [False, True])
def test_forward_matches_reference(rng, normalize_V):
    p = tiny_problem(rng)
    model = make_model(p, normalize_attribute_vectors=normalize_V, fusion_weights=(0.7, 0.3), return_features=True)
    out = {k: np.asarray(v) for k, v in model(channel_last(p["fmap_bfr"])).items()}
    want = reference(p, normalize_V=normalize_V)
    np.testing.assert_allclose(out["logits_a2v"], want["S1"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(out["logits_v2a"], want["S2"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(out["logits"], 0.7 * want["S1"] + 0.3 * want["S2"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(out["attention_a2v"], want["A"], rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(out["attention_v2a"], want["Bw"], rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(out["scores_a2v"], want["psi"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(out["scores_v2a"], want["phi"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(out["features_a2v"], want["F_p"], rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(out["features_v2a"], want["u"], rtol=RTOL, atol=1e-7)
    # Softmax axes: A over regions, Bw over attributes.
    np.testing.assert_allclose(out["attention_a2v"].sum(axis=2), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["attention_v2a"].sum(axis=1), 1.0, rtol=1e-5)


def test_map_input_equals_region_input(rng):
    p = tiny_problem(rng, R=6)
    model = make_model(p)
    x = channel_last(p["fmap_bfr"])
    maps = x.reshape(x.shape[0], 2, 3, x.shape[2])  # (B, H, W, F), row-major regions
    np.testing.assert_allclose(np.asarray(model(maps)["logits"]), np.asarray(model(x)["logits"]), rtol=1e-6)


def test_bias_margin_matches_reference(rng):
    p = tiny_problem(rng)
    model = make_model(p, bias=0.5)
    np.testing.assert_array_equal(np.asarray(model.mask_bias), p["mask_bias"])
    want = reference(p, bias=0.5)
    out = model(channel_last(p["fmap_bfr"]))
    np.testing.assert_allclose(np.asarray(out["logits_a2v"]), want["S1"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["logits_v2a"]), want["S2"], rtol=RTOL, atol=1e-6)
    # The fused test logits keep the margin: unseen classes are favoured by 2 * bias (w1 + w2 = 1).
    no_margin = make_model(p, bias=0.0)(channel_last(p["fmap_bfr"]))["logits"]
    np.testing.assert_allclose(
        np.asarray(out["logits"]) - np.asarray(no_margin),
        np.broadcast_to(0.5 * p["mask_bias"], no_margin.shape),
        atol=1e-5,
    )


@pytest.mark.parametrize("bias", [None, 0.0])
def test_every_loss_term_matches_reference(rng, bias):
    """Every §4 term, with a random non-zero margin (and without one): CE removes it, the rest see it."""
    p = tiny_problem(rng)
    if bias is not None:
        p["bias"] = bias
    model = make_model(p, lambda_cal=0.3, distill_weight=0.05)
    out = model(channel_last(p["fmap_bfr"]))
    want = reference(p)
    S1, S2, y, U = want["S1"], want["S2"], p["labels"], p["unseen"]
    margin = p["bias"] * p["mask_bias"]
    terms = {k: float(v) for k, v in model.compute_loss_terms(out, y).items()}
    np.testing.assert_allclose(terms["ce_a2v"], ref.ce(S1 - margin, y), rtol=RTOL)
    np.testing.assert_allclose(terms["ce_v2a"], ref.ce(S2 - margin, y), rtol=RTOL)
    np.testing.assert_allclose(terms["cal_a2v"], ref.cal(S1, U), rtol=RTOL)
    np.testing.assert_allclose(terms["cal_v2a"], ref.cal(S2, U), rtol=RTOL)
    np.testing.assert_allclose(terms["distill"], ref.jsd(S1, S2) + ref.logit_term(S1, S2), rtol=RTOL)
    np.testing.assert_allclose(terms["loss"], ref.total_loss(S1, S2, y, U, 0.3, 0.05, margin), rtol=RTOL)
    if p["bias"]:
        # The margin changes self-calibration and the JSD: a check that cannot pass by ignoring it.
        assert abs(terms["cal_a2v"] - ref.cal(S1 - margin, U)) > 1e-3
        assert abs(terms["distill"] - ref.jsd(S1 - margin, S2 - margin) - ref.logit_term(S1, S2)) > 1e-6


def test_paper_forms_relate_to_the_margin_as_documented(rng):
    """Paper Eq. 7 forms: seen-only CE and the ±1 indicator act on the margin-free logits."""
    p = tiny_problem(rng)
    model = make_model(p, cross_entropy="seen", calibration="indicator")
    out = model(channel_last(p["fmap_bfr"]))
    want = reference(p)
    raw1 = want["S1"] - p["bias"] * p["mask_bias"]
    terms = {k: float(v) for k, v in model.compute_loss_terms(out, p["labels"]).items()}
    np.testing.assert_allclose(terms["ce_a2v"], ref.ce(raw1, p["labels"], classes=p["seen"]), rtol=RTOL)
    np.testing.assert_allclose(terms["cal_a2v"], ref.cal_paper(raw1, p["unseen"]), rtol=RTOL)


def test_loss_functions_and_paper_variants(rng):
    S1 = rng.normal(size=(5, 7)) * 3
    S2 = rng.normal(size=(5, 7)) * 3
    y = np.array([0, 1, 2, 4, 5])
    U, seen = [3, 6], [0, 1, 2, 4, 5]
    f32 = lambda a: a.astype("float32")
    unseen_mask = np.isin(np.arange(7), U).astype("float32")
    seen_mask = 1 - unseen_mask
    checks = [
        (L.cross_entropy(f32(S1), y), ref.ce(S1, y)),
        (L.cross_entropy_seen(f32(S1), y, seen_mask), ref.ce(S1, y, classes=seen)),
        (L.self_calibration(f32(S1), unseen_mask), ref.cal(S1, U)),
        (L.self_calibration_paper(f32(S1), unseen_mask), ref.cal_paper(S1, U)),
        (L.jensen_shannon(f32(S1), f32(S2)), ref.jsd(S1, S2)),
        (L.cubic_logit_distance(f32(S1), f32(S2)), ref.logit_term(S1, S2)),
        (L.squared_l2_distance(f32(S1), f32(S2)), ref.sq_l2(S1, S2)),
        (L.distillation(f32(S1), f32(S2), "paper"), ref.jsd(S1, S2) + ref.sq_l2(S1, S2)),
        (L.distillation(f32(S1), f32(S2), "jsd"), ref.jsd(S1, S2)),
        (L.distillation(f32(S1), f32(S2), "logit"), ref.logit_term(S1, S2)),
        (L.distillation(f32(S1), f32(S2), "none"), 0.0),
    ]
    for got, want in checks:
        np.testing.assert_allclose(float(got), want, rtol=RTOL, atol=1e-7)
    with pytest.raises(ValueError, match="unknown distillation"):
        L.distillation(f32(S1), f32(S2), "typo")


def test_identical_logits_give_zero_distillation_without_nan():
    import tensorflow as tf

    S = tf.Variable(np.ones((2, 3), "float32"))
    with tf.GradientTape() as tape:
        value = L.cubic_logit_distance(S, tf.identity(S))
    assert float(value) == 0.0
    assert np.all(np.isfinite(tape.gradient(value, S)))


@pytest.mark.parametrize(
    "C,U,ce_want,cal_want,cal_want_no_margin",
    [
        (200, 50, 5.2983, 0.3408, 1.3863),  # CUB
        (717, 72, 6.5751, 0.7941, 2.2984),  # SUN
        (50, 10, 3.9120, 0.4327, 1.6094),  # AWA2
    ],
)
def test_values_at_initialisation(rng, C, U, ce_want, cal_want, cal_want_no_margin):
    """docs/reference.md §4: S2 = bias * mask_bias at initialisation, with the default bias 1 and with 0."""
    K, D, F, R, B = 12, 8, 16, 9, 6
    unseen = sorted(rng.choice(C, size=U, replace=False).tolist())
    seen = [c for c in range(C) if c not in unseen]
    model = build_msdn(rng.random((C, K)), rng.normal(size=(K, D)), seen, unseen, feature_dim=F, seed=3)
    assert float(np.asarray(model.bias)) == 1.0  # the reference's default margin
    # Reference initialisation (§2): V = normalised w2v, W_1 ~ N(0, 1), the others zero.
    np.testing.assert_allclose(np.linalg.norm(np.asarray(model.embedding.V), axis=1), 1.0, rtol=1e-6)
    for w in (model.a2v.W_2, model.v2a.W_1_1, model.v2a.W_2_1):
        assert not np.any(np.asarray(w))
    w1 = np.asarray(model.a2v.W_1)
    assert abs(w1.mean()) < 0.2 and 0.8 < w1.std() < 1.2
    x = rng.random((B, R, F)).astype("float32")
    out = model(x)
    np.testing.assert_array_equal(
        np.asarray(out["logits_v2a"]), np.broadcast_to(np.asarray(model.mask_bias), (B, C))
    )  # S2 = margin
    np.testing.assert_allclose(np.asarray(out["attention_v2a"]), 1.0 / K, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["attention_a2v"]), 1.0 / R, rtol=1e-6)
    terms = model.compute_loss_terms(out, np.array(seen[:B]))
    assert float(terms["ce_v2a"]) == pytest.approx(ce_want, abs=1e-4)
    assert float(terms["cal_v2a"]) == pytest.approx(cal_want, abs=1e-4)
    no_margin = build_msdn(rng.random((C, K)), rng.normal(size=(K, D)), seen, unseen, feature_dim=F, bias=0.0)
    terms = no_margin.compute_loss_terms(no_margin(x), np.array(seen[:B]))
    assert float(terms["ce_v2a"]) == pytest.approx(ce_want, abs=1e-4)
    assert float(terms["cal_v2a"]) == pytest.approx(cal_want_no_margin, abs=1e-4)


def test_zero_word_vector_row_stays_zero(rng):
    w2v = rng.normal(size=(4, 6))
    w2v[2] = 0.0  # like SUN's "man-made"
    model = build_msdn(rng.random((5, 4)), w2v, [0, 1, 2], [3, 4], feature_dim=8)
    V = np.asarray(model.embedding.V)
    assert not np.any(V[2])
    np.testing.assert_allclose(np.linalg.norm(V[[0, 1, 3]], axis=1), 1.0, rtol=1e-6)


def test_weight_names_are_the_reference_state_dict_names(rng):
    p = tiny_problem(rng)
    model = make_model(p)
    names = {w.name for w in model.weights}
    assert names == {"V", "att", "W_1", "W_2", "W_1_1", "W_2_1", "bias", "mask_bias"}
    trainable = {w.name for w in model.trainable_weights}
    assert trainable == {"V", "W_1", "W_2", "W_1_1", "W_2_1"}


@pytest.mark.parametrize(
    "branches,zeroed", [("a2v", ("ce_v2a", "cal_v2a", "distill")), ("v2a", ("ce_a2v", "cal_a2v", "distill"))]
)
def test_single_branch_ablations_drop_the_other_terms(rng, branches, zeroed):
    p = tiny_problem(rng)
    model = make_model(p, branches=branches)
    terms = model.compute_loss_terms(model(channel_last(p["fmap_bfr"])), p["labels"])
    for key in zeroed:
        assert float(terms[key]) == 0.0
    active = "a2v" if branches == "a2v" else "v2a"
    assert float(terms["loss"]) == pytest.approx(
        float(terms[f"ce_{active}"]) + 0.1 * float(terms[f"cal_{active}"]), rel=1e-6
    )


def test_uniform_attention_is_global_average_pooling(rng):
    p = tiny_problem(rng)
    model = make_model(p, attention="uniform")
    out = model(channel_last(p["fmap_bfr"]))
    Fs = ref.normalize(p["fmap_bfr"], axis=1).mean(axis=2)  # (B, F): pooled normalised regions
    psi = Fs @ (p["V"] @ p["W_1"]).T
    np.testing.assert_allclose(np.asarray(out["scores_a2v"]), psi, rtol=RTOL, atol=1e-6)


def test_invalid_arguments_are_rejected(rng):
    with pytest.raises(ValueError, match="overlap"):
        MSDN(num_classes=4, num_attributes=2, feature_dim=3, seen_classes=[0, 1], unseen_classes=[1, 2])
    with pytest.raises(ValueError, match="cross_entropy"):
        MSDN(num_classes=4, num_attributes=2, feature_dim=3, seen_classes=[0], unseen_classes=[1], cross_entropy="both")
    with pytest.raises(ValueError, match="same K"):
        build_msdn(rng.random((4, 3)), rng.random((2, 5)), [0], [1])
