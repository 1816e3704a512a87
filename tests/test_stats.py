"""Mergeable statistics: any split of the rows, merged in any order, gives the in-memory result."""

from __future__ import annotations

import math
import warnings
from functools import reduce
from itertools import permutations

import numpy as np
import pytest

from cnnbal.core import (
    DEFAULT_PARAMS,
    FitParams,
    _as_float64_rows,
    apply_correction,
    class_accuracy,
    fit_elaborated,
    fit_naive,
)
from cnnbal.metrics import METRIC_NAMES, compare, exact_sum, exact_to_float
from cnnbal.stats import (
    ClassCountStats,
    EvalStats,
    FitStats,
    NormalEquationStats,
    merge_stats,
)
from tests.conftest import make_outputs


def split(n_rows, n_parts, seed=0):
    """Random contiguous blocks covering 0..n_rows, some possibly tiny."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n_rows), n_parts - 1, replace=False))
    return [slice(a, b) for a, b in zip(np.r_[0, cuts], np.r_[cuts, n_rows], strict=True)]


def streamed_fit(probs, labels, method="elaborated", params=DEFAULT_PARAMS, parts=5, seed=0):
    """The two-pass fit over blocks, as an engine would run it (blocks in shuffled order)."""
    n_classes = probs.shape[1]
    blocks = split(len(labels), parts, seed)
    np.random.default_rng(seed + 1).shuffle(blocks)
    counts = reduce(
        merge_stats,
        (ClassCountStats.from_chunk(probs[b], labels[b], n_classes) for b in blocks),
    )
    weights = counts.class_weight_sq(params) if method == "elaborated" else None
    system = reduce(
        merge_stats,
        (
            NormalEquationStats.from_chunk(
                probs[b], labels[b], method=method, params=params, class_weight_sq=weights
            )
            for b in blocks
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FitStats(counts, system).finish(params)


def in_memory(probs, labels, method="elaborated", params=DEFAULT_PARAMS):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "naive":
            return fit_naive(probs, labels)
        return fit_elaborated(probs, labels, params)


# ------------------------------------------------------------------ class counts


def test_class_counts_hand_computed_and_equal_to_class_accuracy():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([0, 0, 1, 2])
    stats = ClassCountStats.from_chunk(probs, labels)
    np.testing.assert_array_equal(stats.counts, [2, 1, 1])
    np.testing.assert_array_equal(stats.correct, [1, 0, 1])
    accuracy, counts = stats.finish()
    np.testing.assert_array_equal(accuracy, [0.5, 0.0, 1.0])
    expected = class_accuracy(probs, labels)
    np.testing.assert_array_equal(accuracy, expected[0])
    np.testing.assert_array_equal(counts, expected[1])


def test_class_counts_merge_is_a_plain_sum_with_empty_as_neutral_element():
    probs, labels = make_outputs(300, 5, seed=1)
    blocks = split(300, 4)
    parts = [ClassCountStats.from_chunk(probs[b], labels[b]) for b in blocks]
    whole = ClassCountStats.from_chunk(probs, labels)
    for order in permutations(parts):
        merged = reduce(merge_stats, order, ClassCountStats.empty(5))
        np.testing.assert_array_equal(merged.counts, whole.counts)
        np.testing.assert_array_equal(merged.correct, whole.correct)
    # unbound use, as an engine calls it: merge(a, b)
    pair = ClassCountStats.merge(parts[0], parts[1])
    np.testing.assert_array_equal(pair.counts, parts[0].counts + parts[1].counts)


def test_class_weights_floor_zero_accuracy_at_half_a_sample():
    # class 1: 4 samples, none right -> accuracy floored at 0.5 / 4
    probs = np.array([[0.9, 0.1]] * 6)
    labels = np.array([0, 0, 1, 1, 1, 1])
    weights = ClassCountStats.from_chunk(probs, labels).class_weight_sq(FitParams(beta=1.5))
    np.testing.assert_allclose(weights, [1.0, (0.5 / 4) ** -3.0])


# ------------------------------------------------------------------ fit


@pytest.mark.parametrize("method", ["elaborated", "naive"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_streamed_fit_equals_in_memory_fit(method, dtype):
    probs, labels = make_outputs(2_000, 12, seed=2)
    probs = probs.astype(dtype)
    expected = in_memory(probs, labels, method)
    result = streamed_fit(probs, labels, method, parts=7)
    np.testing.assert_allclose(result.H, expected.H, rtol=0, atol=1e-10)
    assert result.n_competitive == expected.n_competitive
    assert result.n_samples == expected.n_samples
    np.testing.assert_array_equal(result.class_counts, expected.class_counts)
    np.testing.assert_array_equal(result.class_accuracy, expected.class_accuracy)
    assert result.warnings == expected.warnings


def test_streamed_fit_with_zero_accuracy_classes_and_classes_missing_from_blocks():
    probs, labels = make_outputs(900, 8, seed=3, weak=(0, 1, 2))
    # class 7 never predicted right (and never competitive: a floored weight of
    # ~1e7 on competitive rows would make the system itself ill-conditioned),
    # class 6 only in the first 100 rows
    probs[labels == 7] = [0.5, 0.05, 0.05, 0.05, 0.05, 0.1, 0.15, 0.05]
    labels[100:][labels[100:] == 6] = 5
    expected = in_memory(probs, labels)
    assert 7 in expected.floored_classes
    result = streamed_fit(probs, labels, parts=6)
    np.testing.assert_allclose(result.H, expected.H, rtol=0, atol=1e-10)
    assert result.floored_classes == expected.floored_classes


def test_streamed_fit_with_empty_competitive_set_is_the_identity_with_the_same_note():
    probs, labels = make_outputs(200, 4, seed=4)
    params = FitParams(r_low=0.1, r_high=0.2)  # no row has a max below 0.25 for K=4
    expected = in_memory(probs, labels, params=params)
    result = streamed_fit(probs, labels, params=params, parts=3)
    assert result.n_competitive == 0
    np.testing.assert_array_equal(result.H, np.hstack([np.eye(4), np.zeros((4, 1))]))
    assert result.warnings == expected.warnings


def test_blocks_without_competitive_rows_add_nothing():
    confident = np.zeros((10, 5))
    confident[:, 0] = 1.0
    stats = NormalEquationStats.from_chunk(
        confident, np.zeros(10, dtype=int), class_weight_sq=np.ones(5)
    )
    assert stats.n_rows == 0
    np.testing.assert_array_equal(stats.gram, 0)
    np.testing.assert_array_equal(stats.rhs, 0)


def test_normal_equation_sums_match_the_definition():
    # rows renormalised in float64; gram = sum w pbar pbar^T, rhs = sum w e_c pbar^T
    probs, labels = make_outputs(300, 4, seed=6)
    weights = np.array([1.0, 2.0, 3.0, 4.0])
    stats = NormalEquationStats.from_chunk(
        probs, labels, params=FitParams(r_low=0.0, r_high=1.0), class_weight_sq=weights
    )
    pbar = np.hstack([_as_float64_rows(probs), np.ones((300, 1))])
    mask = (pbar[:, :4].max(axis=1) < 1.0) & (pbar[np.arange(300), labels] > 0.0)
    w = weights[labels][mask]
    np.testing.assert_allclose(stats.gram, (pbar[mask] * w[:, None]).T @ pbar[mask], rtol=1e-12)
    onehot = np.eye(4)[labels[mask]]
    np.testing.assert_allclose(stats.rhs, (onehot * w[:, None]).T @ pbar[mask], rtol=1e-12)


def test_elaborated_pass_two_needs_the_weights():
    probs, labels = make_outputs(50, 3)
    with pytest.raises(ValueError, match="class_weight_sq"):
        NormalEquationStats.from_chunk(probs, labels)
    naive = NormalEquationStats.empty(3, "naive")
    with pytest.raises(ValueError, match="cannot merge"):
        NormalEquationStats.empty(3).merge(naive)


def test_streamed_fit_on_cifar_sized_outputs():
    # K = 100, 10,000 rows of a confident-ish classifier: the real-data shape
    probs, labels = make_outputs(10_000, 100, seed=7, weak=tuple(range(20)), temperature=0.5)
    for method in ("elaborated", "naive"):
        expected = in_memory(probs, labels, method)
        result = streamed_fit(probs, labels, method, parts=9)
        np.testing.assert_allclose(result.H, expected.H, rtol=0, atol=1e-10)


# ------------------------------------------------------------------ large K routes


def stacked_lstsq_elaborated(probs, labels, params=DEFAULT_PARAMS):
    """The elaborated H straight from its definition: lstsq on the stacked rows."""
    n_classes = probs.shape[1]
    accuracy, counts = class_accuracy(probs, labels)
    safe = np.where(counts > 0, np.maximum(np.nan_to_num(accuracy), 0.5 / np.maximum(counts, 1)), 1)
    p = _as_float64_rows(probs)
    mask = (p[np.arange(len(labels)), labels] > params.r_low) & (p.max(axis=1) < params.r_high)
    s = safe[labels[mask]] ** -params.beta
    rows = np.hstack([p[mask], np.ones((mask.sum(), 1))]) * s[:, None]
    targets = np.eye(n_classes)[labels[mask]] * s[:, None]
    pad = np.hstack([params.alpha * np.eye(n_classes), np.ones((n_classes, 1))])
    x = np.vstack([rows, pad])
    t = np.vstack([targets, params.alpha * np.eye(n_classes)])
    return np.linalg.lstsq(x, t, rcond=None)[0].T


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fewer_competitive_rows_than_classes_matches_the_stacked_least_squares(dtype):
    # K = 300 and ~40 competitive rows: the fit takes the few-rows (Woodbury) route
    probs, labels = make_outputs(120, 300, seed=8, temperature=0.3)
    probs = probs.astype(dtype)
    result = in_memory(probs, labels)
    assert 0 < result.n_competitive <= 300
    np.testing.assert_allclose(result.H, stacked_lstsq_elaborated(probs, labels), atol=1e-10)
    # and the streamed (gram) route agrees
    np.testing.assert_allclose(streamed_fit(probs, labels).H, result.H, atol=1e-10)


def test_naive_fit_with_fewer_rows_than_classes_is_the_minimum_norm_solution():
    probs, labels = make_outputs(60, 150, seed=9)
    p = _as_float64_rows(probs)
    w0 = np.linalg.pinv(p) @ np.eye(150)[labels]  # the minimum-norm W0^T
    b = w0.T.sum(axis=1) / 151
    expected = np.hstack([w0.T - b[:, None], b[:, None]])
    np.testing.assert_allclose(in_memory(probs, labels, "naive").H, expected, atol=1e-10)


def test_naive_fit_equals_lstsq_on_the_rows_when_well_conditioned():
    probs, labels = make_outputs(3_000, 30, seed=10)
    p = _as_float64_rows(probs)
    w0 = np.linalg.lstsq(p, np.eye(30)[labels], rcond=None)[0].T
    b = w0.sum(axis=1) / 31
    expected = np.hstack([w0 - b[:, None], b[:, None]])
    np.testing.assert_allclose(in_memory(probs, labels, "naive").H, expected, atol=1e-11)


# ------------------------------------------------------------------ evaluate


def test_exact_sum_is_the_correctly_rounded_sum_for_any_split():
    rng = np.random.default_rng(11)
    values = np.concatenate([rng.random(5_000) * 10.0 ** rng.integers(-30, 3, 5_000), [0.0]])
    total = exact_sum(values)
    assert exact_to_float(total) == math.fsum(values)
    assert sum(exact_sum(values[b]) for b in split(len(values), 13)) == total
    assert exact_to_float(exact_sum(np.array([1e-310, 1e-320]))) == math.fsum([1e-310, 1e-320])


def test_eval_stats_hand_computed():
    # K = 2: raw predictions [0, 1, 1], corrected [0, 0, 1], labels [0, 0, 1]
    raw = np.array([[0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    corrected = np.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    labels = np.array([0, 0, 1])
    stats = EvalStats.from_chunk(raw, corrected, labels)
    np.testing.assert_array_equal(stats.confusion_raw, [[1, 1], [0, 1]])
    np.testing.assert_array_equal(stats.confusion_corrected, [[2, 0], [0, 1]])
    assert (stats.fixed, stats.broken, stats.other) == (1, 0, 0)
    comparison = stats.finish()
    assert comparison.metrics["total_accuracy"] == (2 / 3, 1.0)
    raw_error = (0.4**2 * 2 + 0.7**2 * 2 + 0.2**2 * 2) / 3
    assert comparison.metrics["squared_error"][0] == pytest.approx(raw_error, rel=1e-15)
    assert comparison.metrics["balanced_accuracy"] == (0.75, 1.0)
    np.testing.assert_array_equal(comparison.low20_classes, [0])


@pytest.mark.parametrize("layout", ["C", "F"])
def test_merged_eval_stats_equal_compare_exactly(layout):
    probs, labels = make_outputs(3_000, 20, seed=12, weak=(0, 1, 2, 3))
    fit = in_memory(probs, labels)
    corrected = apply_correction(fit.H, probs, fit.apply_gate)
    val_accuracy = np.random.default_rng(0).random(20)
    expected = compare(probs, corrected, labels, val_class_accuracy=val_accuracy)
    raw_blocks = np.asarray(probs, order=layout)
    new_blocks = np.asarray(corrected, order=layout)
    parts = [
        EvalStats.from_chunk(raw_blocks[b], new_blocks[b], labels[b], 20) for b in split(3_000, 8)
    ]
    for order in (parts, parts[::-1]):
        result = reduce(merge_stats, order, EvalStats.empty(20)).finish(val_accuracy)
        for name in METRIC_NAMES:
            assert result.metrics[name] == expected.metrics[name], name
        assert result.changed == expected.changed
        np.testing.assert_array_equal(result.low20_classes, expected.low20_classes)
        np.testing.assert_array_equal(result.low20_val_classes, expected.low20_val_classes)
        np.testing.assert_array_equal(
            result.class_recall_corrected, expected.class_recall_corrected
        )
        assert result.n_samples == 3_000


def test_compare_metrics_unchanged_except_the_exactly_rounded_squared_error():
    # the metrics before mergeable statistics, recomputed from predictions
    probs, labels = make_outputs(1_000, 10, seed=13)
    fit = in_memory(probs, labels)
    corrected = apply_correction(fit.H, probs, fit.apply_gate)
    result = compare(probs, corrected, labels)
    pred_raw, pred_new = probs.argmax(axis=1), corrected.argmax(axis=1)
    assert result.metrics["total_accuracy"] == (
        float(np.mean(pred_raw == labels)),
        float(np.mean(pred_new == labels)),
    )
    member = np.isin(labels, result.low20_classes)
    assert result.metrics["low20_accuracy"][1] == float(np.mean(pred_new[member] == labels[member]))
    residual = corrected.astype(np.float64)
    residual[np.arange(1_000), labels] -= 1
    squared = [math.fsum((row * row).tolist()) for row in residual]
    assert result.metrics["squared_error"][1] == pytest.approx(
        math.fsum(squared) / 1_000, rel=1e-15
    )


def test_raw_only_eval_stats():
    probs, labels = make_outputs(500, 6, seed=14)
    stats = EvalStats.from_outputs(probs, labels)
    np.testing.assert_array_equal(stats.confusion_raw, stats.confusion_corrected)
    comparison = stats.finish()
    for name in METRIC_NAMES:
        raw, new = comparison.metrics[name]
        assert raw == new or (raw != raw and new != new)
    assert comparison.changed == {"fixed": 0, "broken": 0, "other": 0}


def test_from_outputs_corrects_only_rows_below_the_gate_with_the_same_sums():
    probs, labels = make_outputs(2_000, 15, seed=15, temperature=0.5)
    fit = in_memory(probs, labels)
    gated = probs.max(axis=1) >= fit.apply_gate
    assert 0 < gated.sum() < len(labels)  # both kinds of rows present
    expected = EvalStats.from_chunk(probs, apply_correction(fit.H, probs, fit.apply_gate), labels)
    result = EvalStats.from_outputs(probs, labels, fit.H, fit.apply_gate)
    np.testing.assert_array_equal(result.confusion_corrected, expected.confusion_corrected)
    assert result.squared_error_corrected == expected.squared_error_corrected
    assert (result.fixed, result.broken, result.other) == (
        expected.fixed,
        expected.broken,
        expected.other,
    )
