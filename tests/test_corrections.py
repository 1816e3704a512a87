"""Correction kinds: hand-computed outputs, invariants, storage round trips and bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cnnbal.core import apply_correction, fit_elaborated
from cnnbal.corrections import KINDS, Correction, log_probs, softmax_rows
from cnnbal.errors import CnnbalError
from tests.conftest import make_outputs


def every_kind(n_classes=6, seed=0):
    rng = np.random.default_rng(seed)
    H = np.hstack(
        [
            np.eye(n_classes) + 0.05 * rng.normal(size=(n_classes, n_classes)),
            0.01 * rng.normal(size=(n_classes, 1)),
        ]
    )
    return [
        Correction.affine(H, 0.8),
        Correction.logit_bias(rng.normal(size=n_classes), temperature=1.5),
        Correction.temperature(2.0),
        Correction.vector_scaling(1 + 0.2 * rng.normal(size=n_classes), rng.normal(size=n_classes)),
    ]


def test_logit_bias_hand_computed():
    # softmax(log p + b) with b doubling class 1: [0.5, 0.25 * 2, 0.25] / 1.25
    probs = np.array([[0.5, 0.25, 0.25]])
    out = Correction.logit_bias([0.0, np.log(2.0), 0.0]).apply(probs)
    np.testing.assert_allclose(out, [[0.4, 0.4, 0.2]], rtol=1e-12)
    # with a temperature: softmax((log p + b) / 2) = sqrt of the same, renormalised
    out = Correction.logit_bias([0.0, np.log(2.0), 0.0], temperature=2.0).apply(probs)
    root = np.sqrt([0.5, 0.5, 0.25])
    np.testing.assert_allclose(out, [root / root.sum()], rtol=1e-12)


def test_temperature_hand_computed():
    # softmax(log [0.8, 0.2] / 2) = [sqrt .8, sqrt .2] / sum = [2/3, 1/3]
    out = Correction.temperature(2.0).apply(np.array([[0.8, 0.2]]))
    np.testing.assert_allclose(out, [[2 / 3, 1 / 3]], rtol=1e-12)


def test_vector_scaling_identity_and_hand_case():
    probs = np.array([[0.7, 0.2, 0.1]])
    same = Correction.vector_scaling(np.ones(3), np.zeros(3)).apply(probs)
    np.testing.assert_allclose(same, probs, rtol=1e-12)
    # scale 2 on class 0 only: [0.49, 0.2, 0.1] / 0.79
    out = Correction.vector_scaling([2.0, 1.0, 1.0], np.zeros(3)).apply(probs)
    np.testing.assert_allclose(out, [[0.49 / 0.79, 0.2 / 0.79, 0.1 / 0.79]], rtol=1e-12)


def test_affine_delegates_to_the_core_bit_for_bit(outputs):
    probs, labels = outputs
    result = fit_elaborated(probs, labels)
    correction = Correction.affine(result.H, result.apply_gate)
    expected = apply_correction(result.H, probs, result.apply_gate)
    np.testing.assert_array_equal(correction.apply(probs), expected)
    np.testing.assert_array_equal(
        correction.apply(probs, clip=False), apply_correction(result.H, probs, 0.8, clip=False)
    )
    np.testing.assert_array_equal(correction.predict(probs), expected.argmax(axis=1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_linear_kinds_keep_dtype_rows_sum_to_one_and_predict_agrees(dtype):
    probs, _ = make_outputs(n_samples=300, n_classes=6, seed=3)
    probs = probs.astype(dtype)
    for correction in every_kind()[1:]:
        out = correction.apply(probs)
        assert out.dtype == dtype
        assert np.all(out >= 0)
        np.testing.assert_allclose(
            out.sum(axis=1), 1.0, rtol=1e-6 if dtype == np.float32 else 1e-12
        )
        np.testing.assert_array_equal(correction.predict(probs), out.argmax(axis=1))


def test_logit_bias_argmax_is_exactly_argmax_of_log_p_plus_b():
    probs, _ = make_outputs(n_samples=500, n_classes=8, seed=1)
    bias = np.random.default_rng(2).normal(size=8)
    out = Correction.logit_bias(bias, temperature=3.0).apply(probs)
    np.testing.assert_array_equal(out.argmax(axis=1), (log_probs(probs) + bias).argmax(axis=1))


def test_logit_bias_tie_created_by_rounding_goes_to_the_true_winner():
    # log p + b puts class 1 ahead by 1e-12; in float32 both outputs round to 0.5
    probs = np.array([[0.5, 0.5]], dtype=np.float32)
    out = Correction.logit_bias([0.0, 1e-12]).apply(probs)
    assert out.dtype == np.float32
    assert out.argmax(axis=1)[0] == 1
    assert out[0, 1] == np.nextafter(np.float32(0.5), np.float32(1))


def test_exact_zeros_give_finite_outputs_floored_at_the_dtype_tiny():
    probs = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    z = log_probs(probs)
    np.testing.assert_allclose(z[0, 1:], np.log(np.finfo(np.float32).tiny))
    for correction in every_kind(3)[1:]:
        out = correction.apply(probs)
        assert np.all(np.isfinite(out))
    # a bias large enough to beat log(tiny) = -87.3 moves the prediction off the zero's row
    assert Correction.logit_bias([0.0, 90.0, 0.0]).predict(probs)[0] == 1
    assert Correction.logit_bias([0.0, 80.0, 0.0]).predict(probs)[0] == 0


def test_rows_that_do_not_sum_to_one_are_treated_as_their_normalisation():
    probs = np.array([[0.6, 0.3, 0.1]])
    for correction in (
        Correction.logit_bias([0.2, -0.1, 0.4]),
        Correction.vector_scaling([1.5, 0.5, 1.0], [0.2, -0.1, 0.4]),
    ):
        np.testing.assert_allclose(
            correction.apply(probs * 0.97), correction.apply(probs), rtol=1e-12
        )
        np.testing.assert_array_equal(correction.predict(probs * 0.97), correction.predict(probs))


def test_logit_bias_is_equivariant_under_class_permutation():
    probs, _ = make_outputs(n_samples=200, n_classes=5, seed=4)
    bias = np.array([0.3, -0.2, 0.0, 0.5, -0.6])
    perm = np.array([3, 0, 4, 1, 2])
    out = Correction.logit_bias(bias).apply(probs)
    permuted = Correction.logit_bias(bias[perm]).apply(probs[:, perm])
    np.testing.assert_allclose(permuted, out[:, perm], rtol=1e-6)


def test_identity_changes_nothing():
    probs, _ = make_outputs(n_samples=100, n_classes=4, seed=5)
    out = Correction.identity(4).apply(probs)
    np.testing.assert_allclose(out, probs, rtol=1e-6)
    np.testing.assert_array_equal(Correction.identity(4).predict(probs), probs.argmax(axis=1))


def test_n_classes_gate_and_changed_rows():
    affine, bias, temperature, scaling = every_kind(6)
    assert [c.n_classes for c in (affine, bias, temperature, scaling)] == [6, 6, None, 6]
    assert affine.gate == 0.8 and bias.gate == np.inf and temperature.gate == np.inf
    row_max = np.array([0.5, 0.8, 0.95])
    np.testing.assert_array_equal(affine.changes_rows(row_max), [True, False, False])
    for correction in (bias, temperature, scaling):
        np.testing.assert_array_equal(correction.changes_rows(row_max), [True, True, True])


def test_storage_round_trip_for_every_kind():
    corrections = every_kind()
    assert [c.kind for c in corrections] == list(KINDS)
    for correction in corrections:
        arrays = correction.to_arrays()
        assert str(arrays["kind"]) == correction.kind
        assert all(v.dtype == np.float64 for k, v in arrays.items() if k != "kind")
        assert Correction.from_arrays(arrays) == correction
        # and through an .npz without pickles
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        buffer.seek(0)
        with np.load(buffer, allow_pickle=False) as archive:
            assert Correction.from_arrays(archive) == correction
    assert every_kind()[1].as_dict()["temperature"] == 1.5


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({}, "no 'kind'"),
        ({"kind": np.array("rotation")}, "unknown kind"),
        ({"kind": np.array("logit_bias"), "bias": np.zeros(3)}, "missing temperature"),
        (
            {"kind": np.array("logit_bias"), "bias": np.zeros(3), "temperature": np.array(0.0)},
            "must be > 0",
        ),
        (
            {"kind": np.array("logit_bias"), "bias": np.array([0, np.nan]), "temperature": 1.0},
            "non-finite",
        ),
        ({"kind": np.array("affine"), "H": np.eye(3), "gate": np.array(0.8)}, "shape (K, K+1)"),
        (
            {"kind": np.array("vector_scaling"), "scale": np.ones(3), "bias": np.zeros(2)},
            "expected 3 values",
        ),
    ],
)
def test_bad_arrays_are_refused(arrays, message):
    with pytest.raises(CnnbalError, match=re.escape(message)):
        Correction.from_arrays(arrays)


def test_applying_to_the_wrong_number_of_classes_is_refused():
    with pytest.raises(CnnbalError, match="for 3 classes"):
        Correction.logit_bias(np.zeros(3)).apply(np.full((2, 4), 0.25))


def test_softmax_rows_is_stable_for_huge_logits():
    out = softmax_rows(np.array([[1000.0, 999.0], [-1000.0, -1001.0]]))
    expected = 1 / (1 + np.exp(-1.0))
    np.testing.assert_allclose(out[:, 0], [expected, expected], rtol=1e-12)
