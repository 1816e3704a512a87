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

from cnnbal.artifact import load_artifact
from cnnbal.check import CHECK_SCORES, ElaboratedFit, FitCheck, check_fit, predict
from cnnbal.cli import app
from cnnbal.core import FitParams, apply_correction, fit_elaborated, fit_naive
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
