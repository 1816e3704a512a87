"""The methods of ``fit --method``: hand-solved cases, independent formulations, invariants, CV."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import approx_fprime, minimize, minimize_scalar
from scipy.special import log_softmax, logsumexp, softmax

from cnnbal import methods as M
from cnnbal.core import fit_elaborated, fit_naive
from cnnbal.corrections import Correction, log_probs
from cnnbal.errors import CnnbalError
from cnnbal.methods import (
    HYPERPARAMS,
    METHOD_NAMES,
    CVEstimate,
    cross_validate,
    fit_method,
    paired_bootstrap,
    recommend,
)
from cnnbal.metrics import lowest_classes, summarize
from cnnbal.sweep import SCORE_NAMES, choose, stratified_folds
from tests.conftest import make_outputs

LOGIT_BIAS_METHODS = (
    "logit-adjust",
    "class-balanced-ce",
    "class-dro",
    "prior-match",
    "worst20-ascent",
)


@pytest.fixture(scope="module")
def weak():
    """Outputs of a classifier weak on classes 0 and 1: biases have something to fix."""
    return make_outputs(n_samples=900, n_classes=6, seed=11)


def symmetric_outputs(n_classes=4, n_base=60, seed=0):
    """Every row with all cyclic shifts of its classes (labels shifted too): balanced and
    symmetric, so every balancing bias must be zero."""
    probs, labels = make_outputs(n_samples=n_base, n_classes=n_classes, seed=seed)
    probs = probs.astype(np.float64)
    rows, targets = [], []
    for shift in range(n_classes):
        rows.append(np.roll(probs, shift, axis=1))
        targets.append((labels + shift) % n_classes)
    return np.vstack(rows), np.concatenate(targets)


# ---------------------------------------------------------------- the public surface


def test_method_names_and_grids():
    assert METHOD_NAMES == (
        "elaborated",
        "naive",
        "logit-adjust",
        "class-balanced-ce",
        "class-dro",
        "prior-match",
        "worst20-ascent",
        "temperature",
        "vector-scaling",
    )
    assert set(HYPERPARAMS) == set(METHOD_NAMES)
    assert all(len(grid) <= 1 for grid in HYPERPARAMS.values())
    assert 0.0 in HYPERPARAMS["worst20-ascent"]["shrink"]  # the identity is always a candidate
    assert 0.0 in HYPERPARAMS["logit-adjust"]["tau"]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_fits_and_reports(method, weak):
    probs, labels = weak
    fitted = fit_method(method, probs, labels)
    assert fitted.method == method
    assert fitted.n_samples == len(labels)
    assert fitted.chosen_by_cv == bool(HYPERPARAMS[method])
    assert set(fitted.hyper) >= set(HYPERPARAMS[method])
    out = fitted.correction.apply(probs)
    assert out.shape == probs.shape and out.dtype == np.float32
    np.testing.assert_array_equal(fitted.class_counts, np.bincount(labels, minlength=6))
    if fitted.chosen_by_cv:
        name = next(iter(HYPERPARAMS[method]))
        assert fitted.cv["name"] == name
        assert fitted.cv["chosen"] == fitted.hyper[name]
        assert set(fitted.cv["mean_scores"]) == set(SCORE_NAMES)


def test_elaborated_and_naive_wrap_the_core(weak):
    probs, labels = weak
    elaborated = fit_method("elaborated", probs, labels)
    np.testing.assert_array_equal(
        elaborated.correction.params["H"], fit_elaborated(probs, labels).H
    )
    assert elaborated.correction.gate == 0.8
    naive = fit_method("naive", probs, labels)
    np.testing.assert_array_equal(naive.correction.params["H"], fit_naive(probs, labels).H)
    assert naive.correction.gate == np.inf


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "magic"}, "unknown method"),
        ({"method": "class-dro", "hyper": {"tau": 1.0}}, "unknown hyper-parameter 'tau'"),
        ({"method": "class-dro", "hyper": {"eta": 0.0}}, "must be > 0"),
        ({"method": "worst20-ascent", "hyper": {"shrink": 1.5}}, r"in \[0, 1\]"),
        ({"method": "class-dro", "labels": None}, "needs labels"),
        ({"method": "class-dro", "unlabelled": True}, "only prior-match"),
        ({"method": "prior-match", "prior": "zipf"}, "unknown prior"),
        ({"method": "prior-match", "prior": np.ones(5)}, "expected 6 weights"),
        ({"method": "prior-match", "prior": np.array([1, 1, 1, 1, 1, 0.0])}, "positive"),
        ({"method": "prior-match", "prior": "val", "unlabelled": True}, "needs labels"),
        ({"method": "naive", "params": M.FitParams()}, "elaborated"),
        ({"method": "class-dro", "objective": "accuracy"}, "unknown objective"),
    ],
)
def test_bad_requests_are_refused(kwargs, message, weak):
    probs, labels = weak
    kwargs = {"labels": labels, **kwargs}
    method = kwargs.pop("method")
    with pytest.raises(CnnbalError, match=message):
        fit_method(method, probs, kwargs.pop("labels"), **kwargs)


# ---------------------------------------------------------------- prior matching


def test_prior_match_one_row_by_hand():
    # one row [0.8, 0.2] matched to a uniform prior: b_1 - b_0 = log 4, centred [-log 2, log 2]
    fitted = fit_method("prior-match", np.array([[0.8, 0.2]]), unlabelled=True)
    np.testing.assert_allclose(fitted.correction.params["bias"], [-np.log(2), np.log(2)], atol=1e-6)
    assert fitted.hyper == {"temperature": 1.0} and not fitted.chosen_by_cv
    assert fitted.class_accuracy is None
    assert any("without labels" in note for note in fitted.warnings)


def test_prior_match_two_rows_by_hand():
    # rows [0.9, 0.1], [0.6, 0.4], r = exp(b1 - b0): mean of 0.9/(0.9+0.1r) and
    # 0.6/(0.6+0.4r) is 1/2  <=>  0.54 = 0.04 r^2  <=>  r = sqrt(13.5)
    probs = np.array([[0.9, 0.1], [0.6, 0.4]])
    bias = fit_method("prior-match", probs, unlabelled=True).correction.params["bias"]
    np.testing.assert_allclose(bias[1] - bias[0], 0.5 * np.log(13.5), atol=1e-6)
    np.testing.assert_allclose(bias.sum(), 0.0, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("prior", ["uniform", "val", "given"])
def test_prior_match_matches_the_target(temperature, prior, weak):
    probs, labels = weak
    target = {
        "uniform": np.full(6, 1 / 6),
        "val": np.bincount(labels, minlength=6) / len(labels),
        "given": np.array([1, 2, 3, 4, 5, 6]) / 21,
    }[prior]
    fitted = fit_method(
        "prior-match",
        probs,
        labels,
        hyper={"temperature": temperature},
        prior=target * 7 if prior == "given" else prior,  # weights are normalised
    )
    corrected = fitted.correction.apply(probs.astype(np.float64))
    np.testing.assert_allclose(corrected.mean(axis=0), target, atol=1e-6)
    # the correction is softmax((log p + b) / T): the same bias in the scale of log p
    z = log_probs(probs)
    np.testing.assert_allclose(
        corrected, softmax((z + fitted.correction.params["bias"]) / temperature, axis=1)
    )


def test_prior_match_dual_gradient_against_finite_differences(weak):
    probs, _ = weak
    z = log_probs(probs)
    prior = np.array([0.1, 0.2, 0.1, 0.2, 0.3, 0.1])
    temperature = 1.5
    problem = M._BiasProblem(z, temperature)
    weights = np.full(len(z), 1 / len(z))

    def dual(u):  # written directly: mean_n logsumexp(z_n / T + u) - prior . u
        return logsumexp(z / temperature + u, axis=1).mean() - prior @ u

    u = np.random.default_rng(0).normal(size=6)
    lse, mean_q = problem.lse_and_softmax_mean(u, weights)
    np.testing.assert_allclose(lse.mean() - prior @ u, dual(u), rtol=1e-12)
    np.testing.assert_allclose(mean_q - prior, approx_fprime(u, dual, 1e-7), atol=1e-6)


def test_unlabelled_prior_match_equals_the_labelled_fit_at_the_same_temperature(weak):
    probs, labels = weak
    unlabelled = fit_method("prior-match", probs, unlabelled=True)
    labelled = fit_method("prior-match", probs, labels, hyper={"temperature": 1.0})
    np.testing.assert_allclose(
        unlabelled.correction.params["bias"], labelled.correction.params["bias"], atol=1e-12
    )


# ---------------------------------------------------------------- class-balanced CE and DRO


def class_ce(bias, z, labels, n_classes):
    """Per-class mean cross-entropy of softmax(z + bias), written directly."""
    log_q = log_softmax(z + bias, axis=1)
    loss = -log_q[np.arange(len(labels)), labels]
    return np.array([loss[labels == k].mean() for k in range(n_classes)])


def test_class_balanced_ce_against_a_direct_minimisation_of_the_primal(weak):
    probs, labels = weak
    z = log_probs(probs)
    l2 = 0.3
    fitted = fit_method("class-balanced-ce", probs, labels, hyper={"l2": l2})

    def primal(b):
        return class_ce(b, z, labels, 6).mean() + l2 / (2 * 6) * (b @ b)

    direct = minimize(primal, np.zeros(6), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(fitted.correction.params["bias"], direct, atol=1e-4)
    assert fitted.correction.params["bias"][:2].min() > 0  # the weak classes are raised


def test_class_balanced_ce_without_shrink_centres_the_bias(weak):
    probs, labels = weak
    bias = fit_method("class-balanced-ce", probs, labels, hyper={"l2": 0.0}).correction.params[
        "bias"
    ]
    np.testing.assert_allclose(bias.sum(), 0.0, atol=1e-10)
    # stationary: every class's mean predicted mass matches the class-balanced target
    z = log_probs(probs)
    q = softmax(z + bias, axis=1)
    counts = np.bincount(labels, minlength=6)
    weighted = (q / counts[labels, None]).sum(axis=0) / 6
    np.testing.assert_allclose(weighted, np.full(6, 1 / 6), atol=1e-5)


@pytest.mark.parametrize("eta", [3.0, 0.3])
def test_class_dro_against_a_direct_minimisation_of_the_soft_max(eta, weak):
    probs, labels = weak
    z = log_probs(probs)
    fitted = fit_method("class-dro", probs, labels, hyper={"eta": eta})

    def primal(b):
        return eta * logsumexp(class_ce(b, z, labels, 6) / eta)

    direct = minimize(
        primal,
        np.zeros(6),
        method="Nelder-Mead",
        options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 20000},
    ).x
    bias = fitted.correction.params["bias"]
    assert primal(bias) <= primal(direct) + 1e-7
    np.testing.assert_allclose(bias, direct - direct.mean(), atol=2e-3)


def test_class_dro_tends_to_class_balanced_ce_for_large_eta(weak):
    probs, labels = weak
    dro = fit_method("class-dro", probs, labels, hyper={"eta": 1e4}).correction.params["bias"]
    cbce = fit_method("class-balanced-ce", probs, labels, hyper={"l2": 0.0})
    np.testing.assert_allclose(dro, cbce.correction.params["bias"], atol=1e-3)


# ---------------------------------------------------------------- the other fits


def test_logit_adjust_is_minus_tau_log_mean_prediction(weak):
    probs, labels = weak
    fitted = fit_method("logit-adjust", probs, labels, hyper={"tau": 0.7})
    p = probs.astype(np.float64) / probs.sum(axis=1, keepdims=True)
    expected = -0.7 * np.log(p.mean(axis=0))
    np.testing.assert_allclose(
        fitted.correction.params["bias"], expected - expected.mean(), atol=1e-6
    )


def test_temperature_against_a_scalar_minimisation(weak):
    probs, labels = weak
    z = log_probs(probs)
    fitted = fit_method("temperature", probs, labels)

    def nll(t):
        return -log_softmax(z / t, axis=1)[np.arange(len(labels)), labels].mean()

    direct = minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-10}).x
    np.testing.assert_allclose(float(fitted.correction.params["temperature"]), direct, rtol=1e-4)
    # the argmax never changes
    np.testing.assert_array_equal(fitted.correction.predict(probs), probs.argmax(axis=1))


def test_vector_scaling_is_a_stationary_point_of_the_nll(weak):
    probs, labels = weak
    z = log_probs(probs)
    fitted = fit_method("vector-scaling", probs, labels)
    scale, bias = fitted.correction.params["scale"], fitted.correction.params["bias"]

    def nll(x):
        return -log_softmax(z * x[:6] + x[6:], axis=1)[np.arange(len(labels)), labels].mean()

    x = np.concatenate([scale, bias])
    np.testing.assert_allclose(approx_fprime(x, nll, 1e-7), 0.0, atol=1e-5)
    assert nll(x) < nll(np.concatenate([np.ones(6), np.zeros(6)]))


def test_worst20_ascent_raises_the_training_worst20_and_shrink_scales_it(weak):
    probs, labels = weak
    full = fit_method("worst20-ascent", probs, labels, hyper={"shrink": 1.0})
    none = fit_method("worst20-ascent", probs, labels, hyper={"shrink": 0.0})
    half = fit_method("worst20-ascent", probs, labels, hyper={"shrink": 0.5})
    bias = full.correction.params["bias"]
    np.testing.assert_array_equal(none.correction.params["bias"], np.zeros(6))
    np.testing.assert_allclose(half.correction.params["bias"], 0.5 * bias)
    lows = lowest_classes(full.class_accuracy, 2)
    before = summarize(probs, labels, low20_classes=lows)["worst20_accuracy"]
    after = summarize(full.correction.apply(probs), labels, low20_classes=lows)["worst20_accuracy"]
    assert after > before
    assert bias[:2].min() > bias[2:].max()  # the weak classes 0 and 1 got the raises


def test_worst20_ascent_by_hand():
    # class 0 is never predicted: its samples sit 0.3 nats below class 1; raising
    # b_0 by 0.4 (the first step above 0.3) fixes them and breaks none of class 1
    # (those sit 2 nats below), so worst20 goes 0 -> 1 in one move and stops there.
    z = np.log(
        np.array(
            [[0.3, 0.4, 0.3]] * 4  # class 0: log .3 - log .4 = -0.29
            + [[0.1, 0.8, 0.1]] * 4  # class 1
            + [[0.1, 0.1, 0.8]] * 4  # class 2
        )
    )
    labels = np.repeat([0, 1, 2], 4)
    bias = M._worst20_ascent(z, labels)
    np.testing.assert_allclose(bias - bias.mean(), np.array([0.4, 0, 0]) - 0.4 / 3)


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize(
    "method", ["logit-adjust", "class-balanced-ce", "class-dro", "prior-match"]
)
def test_symmetric_balanced_data_need_no_bias(method):
    probs, labels = symmetric_outputs()
    name = next(iter(HYPERPARAMS[method]))
    value = {"tau": 1.0, "l2": 0.0, "eta": 0.5, "temperature": 1.0}[name]
    bias = fit_method(method, probs, labels, hyper={name: value}).correction.params["bias"]
    np.testing.assert_allclose(bias, 0.0, atol=1e-6)


@pytest.mark.parametrize("method", [*LOGIT_BIAS_METHODS, "vector-scaling"])
def test_class_permutation_equivariance(method, weak):
    probs, labels = weak
    perm = np.array([4, 2, 0, 5, 1, 3])  # new class j is old class perm[j]
    inverse = np.argsort(perm)
    name = next(iter(HYPERPARAMS[method]), None)
    hyper = {} if name is None else {name: HYPERPARAMS[method][name][2]}
    original = fit_method(method, probs, labels, hyper=hyper).correction
    permuted = fit_method(method, probs[:, perm], inverse[labels], hyper=hyper).correction
    for key in ("bias", "scale"):
        if key in original.params:
            np.testing.assert_allclose(permuted.params[key], original.params[key][perm], atol=2e-5)


# ---------------------------------------------------------------- cross-validation


def test_cv_choice_is_sweeps_choose_on_the_recorded_scores(weak):
    probs, labels = weak
    fitted = fit_method("class-dro", probs, labels, max_total_drop=1.0)
    cv = fitted.cv
    mean = np.array([cv["mean_scores"][s] for s in SCORE_NAMES]).T  # (n_values, 4)
    raw = np.array([cv["raw_mean_scores"][s] for s in SCORE_NAMES])
    # choose on (means as one fold) gives the same ranking as on the folds' scores
    choice = choose(mean[:, None, :], raw[None, :], objective="worst20", max_total_drop=1.0)
    assert cv["grid"][choice.index] == fitted.hyper["eta"] == cv["chosen"]
    assert cv["eligible"] == choice.eligible.tolist()


def test_cv_uses_only_the_data_it_is_given(weak):
    # the choice is a function of the validation set (and folds, seed) alone
    probs, labels = weak
    a = fit_method("prior-match", probs, labels, seed=3)
    b = fit_method("prior-match", probs.copy(), labels.copy(), seed=3)
    assert a.hyper == b.hyper and a.cv == b.cv
    np.testing.assert_array_equal(a.correction.params["bias"], b.correction.params["bias"])


def test_held_out_scores_agree_with_the_metrics_module(weak):
    probs, labels = weak
    raw_pred = probs.argmax(axis=1)
    train, test = stratified_folds(labels, 3, 0)[1]
    scorer = M._HeldOutScorer.build(raw_pred, labels, train, test, 6)
    pred = Correction.logit_bias([0.5, 0.5, 0, 0, 0, 0]).predict(probs[test])
    train_acc = np.array([np.mean(raw_pred[train][labels[train] == k] == k) for k in range(6)])
    expected = summarize(
        np.eye(6)[pred],
        labels[test],
        low20_classes=np.arange(2),
        low20_val_classes=lowest_classes(train_acc, 1),
    )
    scores = dict(zip(SCORE_NAMES, scorer.scores(pred), strict=True))
    for name in ("total_accuracy", "worst20_accuracy", "balanced_accuracy"):
        assert scores[name] == pytest.approx(expected[name], abs=1e-15)


def test_nothing_eligible_falls_back_to_the_zero_bias(weak, monkeypatch):
    probs, labels = weak
    # a near-hard worst-class objective costs total accuracy; allow no drop at all
    monkeypatch.setitem(M.HYPERPARAMS, "class-dro", {"eta": (0.02,)})
    fitted = fit_method("class-dro", probs, labels, max_total_drop=0.0)
    assert fitted.cv["eligible"] == [False] and fitted.cv["chosen"] is None
    assert "eta" not in fitted.hyper and fitted.chosen_by_cv
    np.testing.assert_array_equal(fitted.correction.params["bias"], np.zeros(6))
    assert any("zero bias" in note for note in fitted.warnings)


def test_cross_validate_is_nested_and_scores_raw_like_the_folds(weak):
    probs, labels = weak
    estimate = cross_validate("temperature", probs, labels, n_folds=3, seed=1)
    # temperature never changes a prediction: corrected scores equal raw ones
    np.testing.assert_array_equal(estimate.fold_scores, estimate.raw_fold_scores)
    assert estimate.mean_change["total_accuracy"] == 0.0
    folds = stratified_folds(labels, 3, 1)
    raw_total = [np.mean(probs[test].argmax(axis=1) == labels[test]) for _, test in folds]
    np.testing.assert_allclose(estimate.raw_fold_scores[:, 0], raw_total)
    # pooled scores: the held-out predictions of all folds together
    np.testing.assert_allclose(
        estimate.raw_pooled_scores[:3],
        [
            np.mean(probs.argmax(axis=1) == labels),
            np.sort(recall(probs.argmax(axis=1), labels))[:1].mean(),
            recall(probs.argmax(axis=1), labels).mean(),
        ],
    )
    prior = cross_validate("prior-match", probs, labels, n_folds=3, seed=1)
    assert len(prior.hyper_per_fold) == 3
    assert all(
        h["temperature"] in HYPERPARAMS["prior-match"]["temperature"] for h in prior.hyper_per_fold
    )


def recall(pred, labels):
    return np.array([np.mean(pred[labels == k] == k) for k in range(labels.max() + 1)])


def estimate(method, total, worst20, raw=(0.80, 0.50)):
    scores = np.array([total, worst20, 0.0, 0.0])
    raw_scores = np.array([raw[0], raw[1], 0.0, 0.0])
    return CVEstimate(
        method, SCORE_NAMES, raw_scores[None], scores[None], ({},), 1, 0, 0.0, raw_scores, scores
    )


def test_recommend_best_eligible_objective_or_none():
    candidates = [
        estimate("a", 0.80, 0.55),
        estimate("b", 0.79, 0.60),  # 1 point of total lost: not eligible at 0.5
        estimate("c", 0.799, 0.57),
    ]
    assert recommend(candidates, "worst20", 0.5) == "c"
    assert recommend(candidates, "worst20", 2.0) == "b"
    assert recommend({e.method: e for e in candidates}, "total", 0.5) is None  # none beats raw
    assert recommend([estimate("d", 0.80, 0.50)]) is None


# ---------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_of_identical_predictions_is_zero():
    labels = np.repeat(np.arange(5), 20)
    pred = (labels + (np.arange(100) % 3 == 0)) % 5
    intervals = paired_bootstrap(labels, pred, pred, n_boot=200, low20_val_classes=np.array([0]))
    assert set(intervals) == {
        "total_accuracy",
        "worst20_accuracy",
        "low20_val_accuracy",
        "balanced_accuracy",
        "worst_class_accuracy",
    }
    assert all(v == (0.0, 0.0) for v in intervals.values())


def test_paired_bootstrap_against_a_loop_over_resamples():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 80)
    pred_raw = np.where(rng.random(80) < 0.7, labels, rng.integers(0, 4, 80))
    pred_new = np.where(rng.random(80) < 0.8, labels, pred_raw)
    classes = np.array([2])
    got = paired_bootstrap(
        labels, pred_raw, pred_new, n_classes=4, low20_val_classes=classes, n_boot=300, seed=9
    )
    idx_all = np.random.default_rng(9).integers(0, 80, size=(300, 80))
    changes = {k: [] for k in got}
    for idx in idx_all:
        y = labels[idx]
        before = summarize(
            np.eye(4)[pred_raw[idx]], y, low20_classes=classes, low20_val_classes=classes
        )
        after = summarize(
            np.eye(4)[pred_new[idx]], y, low20_classes=classes, low20_val_classes=classes
        )
        for k in changes:
            changes[k].append(after[k] - before[k])
    for k, values in changes.items():
        np.testing.assert_allclose(got[k], np.percentile(values, [2.5, 97.5]), atol=1e-12)
    assert got["total_accuracy"][0] > 0  # pred_new fixes mistakes and breaks none
