"""Metrics of docs/method.md section 5 on hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest

from cnnbal.metrics import compare, low_fraction_count, lowest_classes, summarize


@pytest.mark.parametrize(("k", "n"), [(10, 2), (100, 20), (20, 4), (2, 1), (5, 1), (13, 3)])
def test_low_fraction_count(k, n):
    assert low_fraction_count(k) == n


def one_hot_probs(pred, n_classes, confidence=0.7):
    probs = np.full((len(pred), n_classes), (1 - confidence) / (n_classes - 1))
    probs[np.arange(len(pred)), pred] = confidence
    return probs


# 5 classes, 2 samples each except class 4 (4 samples): 12 samples.
LABELS = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4])
RAW = np.array([1, 0, 0, 0, 2, 2, 3, 3, 4, 4, 4, 0])  # recall 0.5, 0, 1, 1, 0.75
NEW = np.array([0, 0, 1, 0, 2, 3, 3, 3, 4, 4, 4, 4])  # recall 1, 0.5, 0.5, 1, 1


def test_summarize_by_hand():
    probs = one_hot_probs(RAW, 5)
    # K=5 -> 1 class in the low 20%; the worst raw class is class 1 (recall 0)
    m = summarize(probs, LABELS, low20_classes=np.array([1]), low20_val_classes=np.array([2]))
    assert m["total_accuracy"] == pytest.approx(8 / 12)
    assert m["low20_accuracy"] == 0.0
    assert m["low20_val_accuracy"] == 1.0
    assert m["worst20_accuracy"] == 0.0
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 0 + 1 + 1 + 0.75) / 5)
    assert m["worst_class_accuracy"] == 0.0
    # F1 = 2tp / (true + predicted): 0: 2*1/(2+4); 1: 0; 2: 1; 3: 1; 4: 2*3/(4+3)
    assert m["macro_f1"] == pytest.approx((1 / 3 + 0 + 1 + 1 + 6 / 7) / 5)
    # each row: 0.7 on pred, 0.075 elsewhere; right: 0.3^2 + 4*0.075^2, wrong: adds more
    right = 0.3**2 + 4 * 0.075**2
    wrong = (0.075 - 1) ** 2 + 0.7**2 + 3 * 0.075**2
    assert m["squared_error"] == pytest.approx((8 * right + 4 * wrong) / 12)


def test_compare_fixed_broken_and_the_biased_low20():
    c = compare(
        one_hot_probs(RAW, 5),
        one_hot_probs(NEW, 5),
        LABELS,
        val_class_accuracy=np.array([0.9, 0.8, 0.2, 0.9, 0.9]),
    )
    np.testing.assert_array_equal(c.low20_classes, [1])
    np.testing.assert_array_equal(c.low20_val_classes, [2])
    # paper's metric: class 1 goes 0 -> 0.5, a gain ...
    assert c.metrics["low20_accuracy"] == (0.0, 0.5)
    # ... while the worst class after correction is at 0.5 too; val-chosen class 2 fell
    assert c.metrics["worst20_accuracy"] == (0.0, 0.5)
    assert c.metrics["low20_val_accuracy"] == (1.0, 0.5)
    # changed: fixed rows 1, 2, 11; broken row 5; other: row 3? raw 0 -> new 0 (no)
    assert c.changed == {"fixed": 3, "broken": 1, "other": 0}
    np.testing.assert_allclose(c.class_recall_corrected, [1, 0.5, 0.5, 1, 1])


def test_wrong_to_other_wrong_is_counted():
    labels = np.array([0, 1, 2])
    c = compare(
        one_hot_probs(np.array([1, 1, 2]), 3), one_hot_probs(np.array([2, 1, 2]), 3), labels
    )
    assert c.changed == {"fixed": 0, "broken": 0, "other": 1}
    assert np.isnan(c.metrics["low20_val_accuracy"][0])


def test_classes_absent_from_evaluation_are_skipped():
    labels = np.array([0, 0, 1, 1])  # class 2 absent
    probs = one_hot_probs(np.array([0, 1, 1, 1]), 3)
    m = summarize(probs, labels, low20_classes=np.array([0]))
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    np.testing.assert_array_equal(lowest_classes(np.array([np.nan, 0.2, 0.1]), 1), [2])
