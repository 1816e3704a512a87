"""The cache-blocked apply kernel against the plain whole-array formulation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cnnbal import kernels
from cnnbal.core import apply_correction, apply_correction_predict


def reference(H, probs, gate, clip=True):
    """docs/method.md section 4 written out on the whole array, in float64."""
    p = np.asarray(probs, dtype=np.float64)
    out = p @ H[:, :-1].T + H[:, -1]
    if clip:
        out = np.maximum(out, 0)
        out /= out.sum(axis=1, keepdims=True)
    keep = p.max(axis=1) >= gate
    out[keep] = p[keep]
    return out


def outputs(n, k, *, seed=0, order="C", dtype=np.float64, sharp=1.0):
    rng = np.random.default_rng(seed)
    logits = sharp * rng.standard_normal((n, k))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p = p.astype(dtype)
    return np.asfortranarray(p) if order == "F" else np.ascontiguousarray(p)


def an_h(k, *, seed=1, scale=0.3):
    rng = np.random.default_rng(seed)
    W = np.eye(k) + scale * rng.standard_normal((k, k)) / k
    b = 0.05 * rng.standard_normal(k)
    return np.hstack([W, b[:, None]])


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clip", [True, False])
def test_every_gate_path_matches_the_whole_array_formula(order, dtype, clip):
    k = 12
    probs = outputs(1000, k, order=order, dtype=dtype, sharp=3.0)
    H = an_h(k)
    row_max = probs.max(axis=1)
    # gates that put 0%, a few, about half, most and all rows below the gate:
    # each block then takes another path (copy, gather, blend, put back, full)
    gates = [0.0, *np.quantile(row_max, [0.1, 0.5, 0.95]), np.inf]
    tol = 2e-6 if dtype == np.float32 else 1e-13
    for gate in gates:
        for block_rows in (7, 64, 1000, 4096):
            result = kernels.affine_blocks(
                H[:, :-1].astype(dtype),
                H[:, -1].astype(dtype),
                probs,
                gate,
                clip=clip,
                row_max=row_max,
                predict=True,
                block_rows=block_rows,
            )
            expected = reference(H, probs, gate, clip)
            np.testing.assert_allclose(result.corrected, expected, atol=tol, rtol=0)
            assert result.corrected.dtype == dtype
            assert result.corrected.flags.f_contiguous == (order == "F")
            keep = row_max >= gate
            # rows at or above the gate come back bit for bit
            assert np.array_equal(result.corrected[keep], probs[keep])
            np.testing.assert_array_equal(result.pred, result.corrected.argmax(axis=1))
            assert result.first_nonfinite is None


def test_block_size_does_not_change_a_row():
    probs = outputs(3000, 20, order="F", dtype=np.float32)
    H = an_h(20)
    gate = float(np.median(probs.max(axis=1)))
    args = (H[:, :-1].astype(np.float32), H[:, -1].astype(np.float32), probs, gate)
    one = kernels.affine_blocks(*args, clip=True, row_max=None, predict=True, block_rows=3000)
    many = kernels.affine_blocks(*args, clip=True, row_max=None, predict=True, block_rows=256)
    np.testing.assert_allclose(one.corrected, many.corrected, atol=1e-7, rtol=0)
    np.testing.assert_array_equal(one.pred, many.pred)


def test_predictions_take_the_first_of_tied_maxima():
    # exact ties, in every position, across block boundaries
    k = 5
    rows = []
    for first in range(k):
        for second in range(first + 1, k):
            row = np.full(k, 0.1)
            row[first] = row[second] = 0.3
            rows.append(row / row.sum())
    probs = np.array(rows * 7)
    identity = np.hstack([np.eye(k), np.zeros((k, 1))])
    for order in ("C", "F"):
        p = np.asfortranarray(probs) if order == "F" else probs
        result = apply_correction_predict(identity, p)
        np.testing.assert_array_equal(result.pred, probs.argmax(axis=1))


@pytest.mark.parametrize("k", [3, 255, 256, 300])
def test_first_argmax_classmajor_matches_numpy(k):
    # 255/256: the class weights change from uint8 to uint16
    rng = np.random.default_rng(k)
    values = rng.integers(0, 4, size=(k, 50)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(kernels.first_argmax_classmajor(values), values.argmax(axis=0))


def test_a_non_finite_result_names_its_first_row():
    # W p + b overflows only where p_4 > 0: give that to row 333 alone
    k = 6
    probs = outputs(500, k)
    probs[:, 4] = 0.0
    probs[333, 4] = 0.5
    probs /= probs.sum(axis=1, keepdims=True)
    H = an_h(k)
    H[2, 4] = H[2, -1] = 1.7e308
    for order in ("C", "F"):
        p = np.asfortranarray(probs) if order == "F" else probs
        for clip in (True, False):
            for block_rows in (10, 333, 334, 500):
                result = kernels.affine_blocks(
                    H[:, :-1],
                    H[:, -1],
                    p,
                    np.inf,
                    clip=clip,
                    row_max=None,
                    predict=True,
                    block_rows=block_rows,
                )
                assert result.first_nonfinite == 333
    # no floating-point warning on the way: the result says it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_correction_predict(H, probs).first_nonfinite == 333


def test_the_cached_work_arrays_take_each_call_own_bias():
    # the scratch arrays are kept between calls of one shape: the bias must not be
    probs = outputs(400, 8, order="F", dtype=np.float32)
    first, second = an_h(8, seed=1), an_h(8, seed=2)
    a = apply_correction(first, probs)
    b = apply_correction(second, probs)
    np.testing.assert_allclose(a, reference(first, probs, np.inf), atol=2e-6)
    np.testing.assert_allclose(b, reference(second, probs, np.inf), atol=2e-6)


def test_many_classes_use_one_product_and_agree():
    k = kernels.MAX_BLOCKED_CLASSES + 1
    probs = outputs(50, k)
    H = an_h(k, scale=0.1)
    result = apply_correction_predict(H, probs, 0.01)
    np.testing.assert_allclose(result.corrected, reference(H, probs, 0.01), atol=1e-12)
    np.testing.assert_array_equal(result.pred, result.corrected.argmax(axis=1))


def test_no_rows():
    H = an_h(4)
    empty = np.empty((0, 4))
    result = apply_correction_predict(H, empty, 0.5)
    assert result.corrected.shape == (0, 4) and result.pred.shape == (0,)
