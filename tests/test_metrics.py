"""Zero-shot metrics on hand-made examples (§7)."""

import numpy as np
import pytest

from msdn_tf.evaluation import metrics as M


def test_per_class_mean_is_not_per_sample_mean():
    labels = [0, 0, 0, 0, 1]
    preds = [0, 0, 0, 0, 0]
    assert M.per_class_accuracy(labels, preds) == pytest.approx(0.5)  # per-sample would be 0.8
    assert M.per_class_accuracies(labels, preds, [0, 1, 2]) == {0: 1.0, 1: 0.0}


def test_harmonic_mean_edges():
    assert M.harmonic_mean(0.0, 0.0) == 0.0
    assert M.harmonic_mean(0.0, 0.9) == 0.0
    assert M.harmonic_mean(0.5, 0.5) == pytest.approx(0.5)
    assert M.harmonic_mean(0.2, 0.6) == pytest.approx(0.3)


def test_czsl_restricts_argmax_to_unseen_classes():
    logits = np.array([[5.0, 1.0, 2.0], [5.0, 3.0, 2.0]])  # class 0 is seen and would win
    np.testing.assert_array_equal(M.czsl_predictions(logits, [1, 2]), [2, 1])


def test_zsl_metrics_by_hand():
    seen, unseen = [0, 1], [2, 3]
    # test_seen: two images of class 0 (one right), one of class 1 (right) -> S = (0.5 + 1) / 2
    logits_s = np.array([[9, 0, 0, 0], [0, 0, 9, 0], [0, 9, 0, 0]], float)
    # test_unseen: class 2 predicted as seen 0 in GZSL but right in CZSL; class 3 right.
    logits_u = np.array([[9, 0, 5, 0], [0, 0, 0, 9]], float)
    m = M.zsl_metrics(logits_s, [0, 0, 1], logits_u, [2, 3], seen, unseen)
    assert m["S"] == pytest.approx(0.75)
    assert m["U"] == pytest.approx(0.5)
    assert m["acc"] == pytest.approx(1.0)
    assert m["H"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)


def test_gzsl_with_u_zero_gives_h_zero():
    m = M.zsl_metrics(np.array([[9.0, 0, 0]]), [0], np.array([[9.0, 0, 1]]), [2], [0, 1], [2])
    assert m["U"] == 0.0 and m["S"] == 1.0 and m["H"] == 0.0


def test_calibrated_stacking_shifts_seen_scores():
    logits = np.array([[3.0, 0.0, 2.0]])
    assert M.gzsl_predictions(logits, [0, 1], gamma=0.0)[0] == 0
    assert M.gzsl_predictions(logits, [0, 1], gamma=1.5)[0] == 2
