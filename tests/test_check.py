"""fit checks what it fitted: cross-validation on VAL, exit 1 and nothing written when H hurts."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cnnbal.check as check_module
from cnnbal.artifact import load_artifact
from cnnbal.check import CHECK_SCORES, ElaboratedFit, FitCheck, check_fit, fit_function, predict
from cnnbal.cli import app
from cnnbal.core import FitParams, apply_correction, fit_elaborated, fit_naive
from cnnbal.errors import CnnbalError
from cnnbal.methods import fit_method
from cnnbal.metrics import summarize
from cnnbal.sweep import stratified_folds
from tests.conftest import make_outputs

REPO = Path(__file__).resolve().parents[1]


def three_weak_classes():
    """The issue's synthetic case: 10 classes, three of them weak (boost 0.6 vs 2.5)."""
    return make_outputs(1000, 10, seed=7, weak=(0, 1, 2))


def strong_outputs():
    """A classifier whose correction does no harm (no weak class)."""
    return make_outputs(1000, 10, seed=5, weak=())


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _scores_by_refitting(probs, labels, fit_fn, n_folds=5, seed=0):
    """The check's definition, written out: refit per fold, score the held-out fold."""
    raw, corrected = [], []
    for train, test in stratified_folds(labels, n_folds, seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted = fit_fn(probs[train], labels[train])
        new = apply_correction(fitted.H, probs[test], fitted.apply_gate)
        n_low = np.arange(1)  # low20 classes are not part of the check
        raw.append(summarize(probs[test], labels[test], low20_classes=n_low))
        corrected.append(summarize(new, labels[test], low20_classes=n_low))
    return (
        {name: np.mean([r[name] for r in raw]) for name in CHECK_SCORES},
        {name: np.mean([c[name] for c in corrected]) for name in CHECK_SCORES},
    )


@pytest.mark.parametrize("params", [FitParams(), FitParams(0.05, 0.9, 2.0, 4.0)])
@pytest.mark.parametrize("data", [three_weak_classes, strong_outputs])
def test_the_fast_path_equals_refitting_on_every_fold(data, params):
    probs, labels = data()
    check = check_fit(probs, labels, ElaboratedFit(params))
    generic = check_fit(probs, labels, lambda p, y: fit_elaborated(p, y, params))
    raw, corrected = _scores_by_refitting(probs, labels, ElaboratedFit(params))
    for name in CHECK_SCORES:
        assert check.cross_validated[name] == pytest.approx((raw[name], corrected[name]), abs=1e-12)
        assert generic.cross_validated[name] == pytest.approx(
            check.cross_validated[name], abs=1e-12
        )
    np.testing.assert_allclose(check.fold_total, generic.fold_total, atol=1e-12)


def test_three_weak_classes_fail_and_strong_outputs_pass():
    probs, labels = three_weak_classes()
    check = check_fit(probs, labels, ElaboratedFit())
    raw, corrected = check.cross_validated["total_accuracy"]
    assert corrected < raw - 0.2 and not check.passed  # about 65% -> 34%
    assert check.total_drop_points == pytest.approx(100 * (raw - corrected))
    # the limit is inclusive and in points
    assert check_fit(probs, labels, ElaboratedFit(), max_total_drop=100 * (raw - corrected)).passed
    assert check_fit(probs, labels, ElaboratedFit(), max_total_drop=float("inf")).passed
    assert check_fit(*strong_outputs(), ElaboratedFit()).passed


def test_in_sample_scores_are_those_of_the_fit_itself():
    probs, labels = three_weak_classes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = fit_elaborated(probs, labels)
    check = check_fit(probs, labels, ElaboratedFit(), fitted=fitted)
    corrected = apply_correction(fitted.H, probs, fitted.apply_gate)
    before = summarize(probs, labels, low20_classes=np.arange(1))
    after = summarize(corrected, labels, low20_classes=np.arange(1))
    for name in CHECK_SCORES:
        assert check.in_sample[name] == pytest.approx((before[name], after[name]), abs=1e-12)


def test_any_correction_plugs_in_through_apply():
    """A non-affine method only needs fit_fn(probs, labels) -> object with apply(probs)."""

    class Identity:
        def apply(self, probs):
            return probs

    class Reverse:  # predicts the least likely class: as harmful as it gets
        def apply(self, probs):
            return -probs

    probs, labels = strong_outputs()
    same = check_fit(probs, labels, lambda p, y: Identity())
    assert same.passed
    for raw, corrected in same.cross_validated.values():
        assert raw == corrected
    worse = check_fit(probs, labels, lambda p, y: Reverse())
    assert not worse.passed and worse.cross_validated["total_accuracy"][1] < 0.05
    naive = check_fit(probs, labels, fit_naive)  # an affine FitResult without a gate
    assert predict(fit_naive(probs, labels), probs).shape == labels.shape
    assert naive.n_folds == 5


def test_too_few_samples_skip_the_check_and_bad_settings_are_refused():
    probs, labels = make_outputs(8, 3, seed=1)
    check = check_fit(probs, labels, ElaboratedFit())
    assert check.passed and "too few" in check.skipped
    assert check.to_dict()["skipped"] == check.skipped
    with pytest.raises(Exception, match="--max-total-drop"):
        check_fit(probs, labels, ElaboratedFit(), max_total_drop=float("nan"))
    with pytest.raises(Exception, match="--seed"):
        check_fit(probs, labels, ElaboratedFit(), seed=-1)


def test_to_dict_is_json_and_holds_both_estimates():
    check = check_fit(*three_weak_classes(), ElaboratedFit())
    payload = json.loads(json.dumps(check.to_dict()))
    assert payload["passed"] is False and payload["n_folds"] == 5
    assert set(payload["in_sample"]) == set(payload["cross_validated"]) == set(CHECK_SCORES)
    assert len(payload["cv_fold_total"]) == 5
    assert isinstance(check, FitCheck) and "-> " in check.summary()


# ---------------------------------------------------------------- the command


@pytest.fixture
def weak_file(tmp_path):
    probs, labels = three_weak_classes()
    path = tmp_path / "val.npz"
    np.savez(path, probs=probs, labels=labels)
    return path


def test_fit_refuses_a_harmful_h_and_writes_nothing(weak_file, tmp_path):
    before = weak_file.read_bytes()
    result = run("fit", weak_file, "-o", tmp_path / "H.npz")
    assert result.exit_code == 1
    failed = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1
    assert "nothing written" in failed[0] and "cnnbal sweep" in failed[0]
    assert "--force" in failed[0] and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.npz"]
    assert weak_file.read_bytes() == before


def test_fit_force_writes_it_with_the_estimates_and_info_shows_them(weak_file, tmp_path):
    target = tmp_path / "H.npz"
    result = run("fit", weak_file, "-o", target, "--force", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["written"] is True and summary["fit_check"]["passed"] is False
    assert "written anyway (--force)" in result.stderr
    stored = load_artifact(target).provenance["fit_check"]
    assert stored == summary["fit_check"]
    raw, corrected = (stored["cross_validated"]["total_accuracy"][k] for k in ("raw", "corrected"))
    assert corrected < raw - 0.2
    info = run("info", target)
    assert info.exit_code == 0
    assert "fit check (5-fold CV)" in info.stdout and "FAILED" in info.stdout
    assert "fit check (in-sample)" in info.stdout
    assert json.loads(run("info", target, "--json").stdout)["provenance"]["fit_check"] == stored


def test_fit_max_total_drop_is_the_limit(weak_file, tmp_path):
    assert run("fit", weak_file, "-o", tmp_path / "H.npz", "--max-total-drop", "100").exit_code == 0
    bad = run("fit", weak_file, "--max-total-drop", "-1")
    assert bad.exit_code == 2 and "--max-total-drop" in bad.stderr


def test_fit_on_the_sample_data_passes_as_a_real_subprocess(tmp_path):
    target = tmp_path / "H.npz"
    result = subprocess.run(
        [sys.executable, "-m", "cnnbal", "fit", REPO / "sample_data" / "val.parquet", "-o", target],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "fit check (5-fold CV)" in result.stdout and "passed" in result.stdout
    assert load_artifact(target).provenance["fit_check"]["passed"] is True


# ---------------------------------------------------------------- the other methods


@pytest.fixture
def six_class_file(tmp_path):
    probs, labels = make_outputs()
    path = tmp_path / "val.npz"
    np.savez(path, probs=probs, labels=labels)
    return path


def _refit_by_hand(method, hyper, probs, labels):
    """Mean held-out total accuracy, raw and corrected, of fit_method refitted per fold."""
    raw, corrected = [], []
    for train, test in stratified_folds(labels, 5, 0):
        correction = fit_method(method, probs[train], labels[train], hyper=hyper).correction
        raw.append(np.mean(probs[test].argmax(axis=1) == labels[test]))
        corrected.append(np.mean(correction.apply(probs[test]).argmax(axis=1) == labels[test]))
    return np.mean(raw), np.mean(corrected)


def test_a_given_hyper_parameter_is_checked_by_refitting_the_method_on_each_fold():
    probs, labels = make_outputs()
    check = check_fit(probs, labels, fit_function("logit-adjust", hyper={"tau": 5.0}))
    raw, corrected = _refit_by_hand("logit-adjust", {"tau": 5.0}, probs, labels)
    assert check.cross_validated["total_accuracy"] == pytest.approx((raw, corrected), abs=1e-12)
    assert corrected < raw - 0.1 and not check.passed  # tau=5 costs about 21 points
    with pytest.raises(CnnbalError, match="no value for tau"):
        fit_function("logit-adjust")  # an inner CV per fold would check another procedure


def test_fit_refuses_a_harmful_given_tau_and_force_writes_it(six_class_file, tmp_path):
    before = six_class_file.read_bytes()
    refused = run(
        "fit", six_class_file, "--method", "logit-adjust", "--tau", "5", "-o", tmp_path / "C.npz"
    )
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    failed = [line for line in refused.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "nothing written" in failed[0]
    assert "Leave --tau out" in failed[0] and "--force" in failed[0]
    assert "no -o/--output" not in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.npz"]
    assert six_class_file.read_bytes() == before

    target = tmp_path / "C.npz"
    forced = run(
        "fit", six_class_file, "--method", "logit-adjust", "--tau", "5", "-o", target, "--force"
    )
    assert forced.exit_code == 0 and "written anyway (--force)" in forced.stderr
    stored = load_artifact(target).provenance["fit_check"]
    assert stored["passed"] is False and "source" not in stored
    raw, corrected = _refit_by_hand("logit-adjust", {"tau": 5.0}, *make_outputs())
    assert stored["cross_validated"]["total_accuracy"]["raw"] == pytest.approx(raw)
    assert stored["cross_validated"]["total_accuracy"]["corrected"] == pytest.approx(corrected)
    info = run("info", target)
    assert (
        info.exit_code == 0 and "fit check (5-fold CV)" in info.stdout and "FAILED" in info.stdout
    )


def test_a_cv_chosen_value_is_written_with_the_estimate_of_the_cv_that_chose_it(
    six_class_file, tmp_path
):
    target = tmp_path / "C.npz"
    result = run("fit", six_class_file, "--method", "logit-adjust", "-o", target, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    stored = load_artifact(target).provenance["fit_check"]
    assert stored == summary["fit_check"] and stored["passed"] is True
    tau = summary["hyper"]["tau"]
    assert stored["source"] == f"the CV that chose tau={tau:g}"
    # the CV's estimate is the check's own: refitting with the chosen tau on the same folds
    probs, labels = make_outputs()
    check = check_fit(probs, labels, fit_function("logit-adjust", hyper={"tau": tau}))
    for name in CHECK_SCORES:
        pair = stored["cross_validated"][name]
        assert (pair["raw"], pair["corrected"]) == pytest.approx(check.cross_validated[name])
    assert "the CV that chose tau" in run("info", target).stdout


def test_methods_without_a_hyper_parameter_are_checked_and_unlabelled_cannot_be(
    six_class_file, tmp_path
):
    scaled = run("fit", six_class_file, "--method", "vector-scaling", "-o", tmp_path / "V.npz")
    assert scaled.exit_code == 0, scaled.output
    stored = load_artifact(tmp_path / "V.npz").provenance["fit_check"]
    assert len(stored["cv_fold_total"]) == 5 and "source" not in stored
    unlabelled = run(
        "fit", six_class_file, "--method", "prior-match", "--unlabelled", "-o", tmp_path / "P.npz"
    )
    assert unlabelled.exit_code == 0, unlabelled.output
    assert "no check is possible" in unlabelled.stdout
    skipped = load_artifact(tmp_path / "P.npz").provenance["fit_check"]
    assert "no check is possible" in skipped["skipped"]


@pytest.mark.parametrize("competitive_folds", [(0, 1), (1, 3), (2,)])
def test_the_fast_path_slices_equal_refitting_at_the_edges(competitive_folds):
    # Four folds of 15 rows; only the folds named hold competitive rows, so some
    # held-out fold is the first or last slice of the sorted rows, some holds none,
    # and with one competitive fold its training part has none (H = [I 0]).
    # Class 3 is always mistaken for class 0: its accuracy is floored.
    rng = np.random.default_rng(3)
    n_folds, per_fold, n_classes = 4, 15, 4
    labels = np.tile(np.arange(n_classes), n_folds * per_fold // n_classes + 1)[
        : n_folds * per_fold
    ]
    probs = np.empty((len(labels), n_classes))
    for n, c in enumerate(labels):
        fold = n // per_fold
        if fold in competitive_folds:
            row = rng.uniform(0.15, 0.3, n_classes)
            row[c] += 0.4 if c != 3 else 0.0
            if c == 3:
                row[0] += 0.5
        else:  # confident (max >= r_high): never competitive
            row = np.full(n_classes, 0.02)
            row[0 if c == 3 else c] = 0.94
        probs[n] = row / row.sum()
    order = np.arange(len(labels))
    folds = [
        (
            np.r_[order[: k * per_fold], order[(k + 1) * per_fold :]],
            order[k * per_fold : (k + 1) * per_fold],
        )
        for k in range(n_folds)
    ]
    params = FitParams()
    raw_pred = probs.argmax(axis=1)
    assert not np.any(raw_pred[labels == 3] == 3)  # class 3 floored at zero accuracy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = check_module._elaborated_folds(probs, labels, folds, params, raw_pred)
        refit = check_module._generic_folds(
            probs, labels, folds, lambda p, y: fit_elaborated(p, y, params)
        )
    np.testing.assert_allclose(fast[0], refit[0], atol=1e-12)
    np.testing.assert_allclose(fast[1], refit[1], atol=1e-12)
