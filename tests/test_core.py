"""The numeric core against hand-computed cases, invariants and an independent formulation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnbal.core import (
    FitParams,
    apply_correction,
    argmax_rows,
    class_accuracy,
    competitive_mask,
    fit,
    fit_elaborated,
    fit_naive,
    identity_h,
)
from tests.conftest import make_outputs


def stacked_elaborated(probs, labels, params=FitParams()):
    """docs/method.md section 3 literally: stack the weighted rows, call pinv (independent)."""
    p = probs.astype(np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    k = p.shape[1]
    pred = p.argmax(axis=1)
    rows, targets = [], []
    for n in range(len(labels)):
        c = labels[n]
        if p[n, c] > params.r_low and p[n].max() < params.r_high:
            members = labels == c
            acc = max(np.mean(pred[members] == c), 0.5 / members.sum())
            s = acc ** (-params.beta)
            rows.append(s * np.append(p[n], 1.0))
            targets.append(s * np.eye(k)[c])
    for c in range(k):
        rows.append(np.append(params.alpha * np.eye(k)[c], 1.0))
        targets.append(params.alpha * np.eye(k)[c])
    X, T = np.array(rows), np.array(targets)
    return (np.linalg.pinv(X) @ T).T


def test_elaborated_hand_computed_two_classes():
    # One competitive sample ([0.6, 0.4], true class 1) and two padding rows: a
    # square system, so H maps each row exactly (solved by hand:
    # row 0: 0.6a+0.4b+c=0, 3a+c=3, 3b+c=0 -> a=1.3, b=0.3, c=-0.9).
    probs = np.array([[0.6, 0.4], [0.1, 0.9], [0.95, 0.05]])
    labels = np.array([1, 1, 0])
    result = fit_elaborated(probs, labels)
    expected = np.array([[1.3, 0.3, -0.9], [-0.3, 0.7, 0.9]])
    np.testing.assert_allclose(result.H, expected, atol=1e-12)
    assert result.n_competitive == 1
    np.testing.assert_allclose(result.class_accuracy, [1.0, 0.5])
    # the competitive sample is now classified right, the gate keeps the confident ones
    corrected = apply_correction(result.H, probs, result.apply_gate, clip=False)
    np.testing.assert_allclose(corrected[0], [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(corrected[1:], probs[1:])


def test_naive_hand_computed_two_classes():
    # Two samples, two classes: an exact fit exists; the minimum-norm one is
    # W0 = P^-1 = [[8, -2], [-1, 9]] / 7, b = W0 1 / 3, W = W0 - b 1^T (docs/method.md section 7.3).
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    labels = np.array([0, 1])
    result = fit_naive(probs, labels)
    expected = np.array([[6 / 7, -4 / 7, 2 / 7], [-11 / 21, 19 / 21, 8 / 21]])
    np.testing.assert_allclose(result.H, expected, atol=1e-12)
    assert np.isinf(result.apply_gate)
    np.testing.assert_allclose(apply_correction(result.H, probs, clip=False), np.eye(2), atol=1e-12)


@pytest.mark.parametrize("n_classes", [3, 10, 60])
def test_elaborated_agrees_with_stacked_pinv(n_classes):
    probs, labels = make_outputs(1500, n_classes, seed=n_classes, weak=(0, 1, 2))
    result = fit_elaborated(probs, labels)
    assert result.n_competitive > 0
    np.testing.assert_allclose(result.H, stacked_elaborated(probs, labels), atol=1e-8, rtol=0)


def test_elaborated_agrees_with_stacked_pinv_other_params():
    probs, labels = make_outputs(800, 8, seed=3)
    params = FitParams(r_low=0.05, r_high=0.9, beta=2.0, alpha=1.5)
    result = fit_elaborated(probs, labels, params)
    np.testing.assert_allclose(result.H, stacked_elaborated(probs, labels, params), atol=1e-8)


def test_naive_agrees_with_pinv_on_stacked_rows():
    probs, labels = make_outputs(500, 7, seed=5)
    p = probs.astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    X = np.hstack([p, np.ones((len(p), 1))])
    expected = (np.linalg.pinv(X) @ np.eye(7)[labels]).T
    np.testing.assert_allclose(fit_naive(probs, labels).H, expected, atol=1e-8)


def test_huge_alpha_pins_w_to_identity_but_not_the_bias():
    # The padding rows are [alpha e_k, 1] (appended 1, not alpha: docs/method.md section 3), so
    # they are met exactly by W = I - b 1^T / alpha for ANY bias b. As alpha grows,
    # H tends to [I b*], with b* the s^2-weighted mean of (e_c - p_n) over the
    # competitive set: a pure shift, not the identity.
    probs, labels = make_outputs()
    p = probs.astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    result = fit_elaborated(probs, labels, FitParams(alpha=1e6))
    acc, _ = class_accuracy(p, labels)
    mask = competitive_mask(p, labels, 0.1, 0.8)
    w = acc[labels[mask]] ** -3.0
    b_star = (w[:, None] * (np.eye(6)[labels[mask]] - p[mask])).sum(axis=0) / w.sum()
    np.testing.assert_allclose(result.H[:, :-1], np.eye(6), atol=1e-5)
    np.testing.assert_allclose(result.H[:, -1], b_star, atol=1e-5)
    assert abs(b_star.sum()) < 1e-12


def test_nothing_to_learn_gives_identity():
    # Competitive samples whose corrected target is already met: a sample set that
    # is symmetric around its own mean residual of zero keeps H at the identity.
    probs = np.array([[0.7, 0.3], [0.3, 0.7], [0.99, 0.01], [0.01, 0.99]])
    labels = np.array([0, 1, 0, 1])
    params = FitParams(r_low=0.1, r_high=0.8, beta=0.0, alpha=1e8)
    result = fit_elaborated(probs, labels, params)
    np.testing.assert_allclose(result.H, identity_h(2), atol=1e-6)


def test_empty_competitive_set_gives_identity_and_warns():
    probs = np.array([[0.95, 0.05], [0.02, 0.98], [0.9, 0.1]])
    labels = np.array([0, 1, 0])
    with pytest.warns(UserWarning, match="competitive set is empty"):
        result = fit_elaborated(probs, labels)
    np.testing.assert_array_equal(result.H, identity_h(2))
    assert result.n_competitive == 0
    assert any("empty" in w for w in result.warnings)


def test_zero_accuracy_class_is_floored_not_infinite():
    probs, labels = make_outputs(400, 5, seed=1)
    # make class 4 always wrong but competitive: shift its mass to class 3
    members = labels == 4
    probs[members] = np.array([0.05, 0.05, 0.05, 0.45, 0.40], dtype=np.float32)
    with pytest.warns(UserWarning, match="floored"):
        result = fit_elaborated(probs, labels)
    assert result.floored_classes == (4,)
    assert np.all(np.isfinite(result.H))
    np.testing.assert_allclose(result.H, stacked_elaborated(probs, labels), atol=1e-8)


def test_class_without_samples_is_reported():
    probs, labels = make_outputs(300, 4, seed=2)
    keep = labels != 2
    with pytest.warns(UserWarning, match="no validation samples"):
        result = fit_elaborated(probs[keep], labels[keep])
    assert result.empty_classes == (2,)
    assert np.isnan(result.class_accuracy[2])
    assert result.class_counts[2] == 0


def test_corrected_rows_sum_to_one_and_clipping_keeps_argmax():
    probs, labels = make_outputs(2000, 10, seed=4)
    result = fit_elaborated(probs[:1000], labels[:1000])
    raw_scores = apply_correction(result.H, probs[1000:], result.apply_gate, clip=False)
    np.testing.assert_allclose(raw_scores.sum(axis=1), 1.0, atol=2e-6)
    assert raw_scores.min() < 0  # the affine scores can be negative ...
    clipped = apply_correction(result.H, probs[1000:], result.apply_gate)
    assert clipped.min() >= 0  # ... the default output cannot
    np.testing.assert_allclose(clipped.sum(axis=1), 1.0, atol=2e-6)
    np.testing.assert_array_equal(clipped.argmax(axis=1), raw_scores.argmax(axis=1))


def test_gate_leaves_confident_rows_untouched():
    probs, labels = make_outputs(1000, 6, seed=6)
    result = fit_elaborated(probs, labels)
    corrected = apply_correction(result.H, probs, result.apply_gate)
    confident = probs.max(axis=1) >= 0.8
    assert confident.any() and (~confident).any()
    np.testing.assert_array_equal(corrected[confident], probs[confident])
    assert not np.allclose(corrected[~confident], probs[~confident])


def test_apply_float64_matches_float32_closely():
    probs, labels = make_outputs(500, 6, seed=7)
    H = fit_elaborated(probs, labels).H
    c32 = apply_correction(H, probs, 0.8)
    c64 = apply_correction(H, probs.astype(np.float64), 0.8)
    assert c32.dtype == np.float32 and c64.dtype == np.float64
    np.testing.assert_allclose(c32, c64, atol=1e-6)


@pytest.mark.parametrize("method", ["elaborated", "naive"])
def test_relabelling_classes_permutes_h(method):
    probs, labels = make_outputs(800, 6, seed=8)
    perm = np.array([3, 0, 5, 1, 4, 2])  # new class j is old class perm[j]
    inverse = np.argsort(perm)
    H = fit(probs, labels, method).H
    H_perm = fit(probs[:, perm], inverse[labels], method).H
    expected = np.hstack([H[np.ix_(perm, perm)], H[perm, -1:]])
    np.testing.assert_allclose(H_perm, expected, atol=1e-9)


@pytest.mark.filterwarnings("ignore:.*floored")
def test_large_k_is_exact():
    probs, labels = make_outputs(6000, 300, seed=9, weak=range(60), temperature=0.5)
    result = fit_elaborated(probs, labels)
    assert result.n_competitive > 100
    # the solution satisfies the normal equations of the stacked system
    np.testing.assert_allclose(result.H, stacked_elaborated(probs, labels), atol=1e-8)


def test_competitive_mask_and_class_accuracy_by_hand():
    probs = np.array([[0.5, 0.3, 0.2], [0.05, 0.9, 0.05], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6]])
    labels = np.array([1, 1, 0, 2])
    # row 0: true 0.3 > 0.1, max 0.5 < 0.8 -> in; row 1: max 0.9 -> out;
    # row 2: true 0.3, max 0.6 -> in; row 3: true 0.6, max 0.6 -> in
    np.testing.assert_array_equal(competitive_mask(probs, labels, 0.1, 0.8), [1, 0, 1, 1])
    acc, counts = class_accuracy(probs, labels)
    np.testing.assert_allclose(acc, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(counts, [1, 2, 1])


@pytest.mark.parametrize("n_classes", [2, 5])
def test_alpha_one_singular_system_gives_the_minimum_norm_solution(n_classes):
    # With alpha = 1 every row, sample or padding, is orthogonal to [1, ..., 1, -1]
    # (rows sum to 1): the normal equations are singular and the answer must be
    # the minimum-norm one, as a pseudo-inverse of the stacked rows gives.
    probs, labels = make_outputs(300, n_classes, seed=n_classes)
    params = FitParams(alpha=1.0)
    with pytest.warns(UserWarning, match="alpha=1 is close to 1"):
        result = fit_elaborated(probs, labels, params)
    np.testing.assert_allclose(result.H, stacked_elaborated(probs, labels, params), atol=1e-8)


def test_fit_rejects_unknown_method():
    probs, labels = make_outputs(50, 3)
    with pytest.raises(ValueError, match="unknown method"):
        fit(probs, labels, "magic")


@settings(max_examples=40, deadline=None)
@given(
    n_classes=st.integers(2, 8),
    n_samples=st.integers(4, 80),
    seed=st.integers(0, 2**31),
    # alpha near 1 makes the system (nearly) singular: tested exactly below
    alpha=st.floats(0.2, 0.8) | st.floats(1.5, 10),
    beta=st.floats(0.0, 3.0),
)
def test_property_matches_stacked_and_sums_to_one(n_classes, n_samples, seed, alpha, beta):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(n_classes, 0.7), n_samples)
    labels = rng.integers(0, n_classes, n_samples)
    params = FitParams(alpha=alpha, beta=beta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit_elaborated(probs, labels, params)
    assert np.all(np.isfinite(result.H))
    if result.n_competitive:
        reference = stacked_elaborated(probs, labels, params)
        scale = max(1.0, np.abs(reference).max())
        np.testing.assert_allclose(result.H, reference, atol=1e-7 * scale)
    corrected = apply_correction(result.H, probs, result.apply_gate, clip=False)
    np.testing.assert_allclose(corrected.sum(axis=1), 1.0, atol=1e-8)


def test_argmax_rows_matches_numpy_in_both_layouts_first_max_wins():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, (500, 6)).astype(np.float32)  # many ties
    expected = scores.argmax(axis=1)
    np.testing.assert_array_equal(argmax_rows(scores), expected)
    np.testing.assert_array_equal(argmax_rows(np.asfortranarray(scores)), expected)


@pytest.mark.parametrize("clip", [True, False])
def test_column_major_input_gives_same_correction_column_major(clip):
    probs, labels = make_outputs(700, 9, seed=12)
    result = fit_elaborated(probs, labels)
    row_major = apply_correction(result.H, probs, result.apply_gate, clip=clip)
    col_major = apply_correction(result.H, np.asfortranarray(probs), result.apply_gate, clip=clip)
    assert col_major.flags.f_contiguous
    np.testing.assert_allclose(col_major, row_major, atol=1e-6)
    confident = probs.max(axis=1) >= result.apply_gate
    np.testing.assert_array_equal(col_major[confident], probs[confident])
