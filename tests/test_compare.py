"""`cnnbal compare` and cnnbal.compare: every method side by side, a recommendation made on
VAL only (identical with no TEST, a TEST, or a scrambled TEST), one table that fits 100
columns, one JSON object, the recommended correction written with -o."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnbal.artifact import load_artifact
from cnnbal.cli import app
from cnnbal.compare import TEST_METRICS, compare_methods, parse_methods
from cnnbal.errors import CnnbalError
from cnnbal.methods import METHOD_NAMES, cross_validate, fit_method, recommend
from cnnbal.metrics import compare

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
# a quick subset: one of each kind, and the default winner on the sample data
FEW = "elaborated,logit-adjust,class-dro,temperature,vector-scaling"


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def full_run(sample):
    """compare_methods over every method, with TEST."""
    val_probs, val_labels, test_probs, test_labels = sample
    return compare_methods(
        val_probs, val_labels, test_probs=test_probs, test_labels=test_labels, n_boot=300
    )


def test_every_method_is_fitted_cross_validated_and_tested(sample, full_run):
    val_probs, val_labels, test_probs, test_labels = sample
    assert [r.method for r in full_run.results] == list(METHOD_NAMES)
    for item in full_run.results:
        # the fit on all of VAL is fit_method's, the estimate cross_validate's (same folds)
        assert item.fit.correction == fit_method(item.method, val_probs, val_labels).correction
        np.testing.assert_array_equal(
            item.cv.fold_scores, cross_validate(item.method, val_probs, val_labels).fold_scores
        )
        # test metrics are metrics.compare of the fitted correction, computed independently
        corrected = item.fit.correction.apply(test_probs)
        expected = compare(
            test_probs, corrected, test_labels, val_class_accuracy=item.fit.class_accuracy
        )
        assert item.test.comparison.metrics == expected.metrics
        assert item.test.n_changed == int(
            np.sum(corrected.argmax(axis=1) != test_probs.argmax(axis=1))
        )
        for name in TEST_METRICS:
            low, high = item.test.intervals[name]
            assert low <= high
        low, high = item.test.intervals["total_accuracy"]
        assert low <= item.test.change("total_accuracy") <= high
    temperature = full_run.result("temperature")  # never changes a prediction
    assert temperature.test.n_changed == 0
    assert temperature.test.intervals["worst20_accuracy"] == (0.0, 0.0)


def test_the_recommendation_is_recommend_on_the_cv_estimates(sample, full_run):
    estimates = [r.cv for r in full_run.results]
    assert full_run.recommended == recommend(estimates, "worst20", 0.5)
    assert full_run.recommended is not None  # on the sample data a method does beat raw
    best = full_run.result(full_run.recommended)
    assert best.eligible
    objective = best.cv.mean_change["worst20_accuracy"]
    for item in full_run.results:
        if item.eligible:
            assert item.cv.mean_change["worst20_accuracy"] <= objective + 1e-12


def test_the_recommendation_never_depends_on_test(sample):
    """The same choice with no TEST, with TEST, and with a scrambled TEST."""
    val_probs, val_labels, test_probs, test_labels = sample
    rng = np.random.default_rng(0)
    scrambled = rng.permutation(test_labels)
    choices = []
    for probs, labels in ((None, None), (test_probs, test_labels), (test_probs, scrambled)):
        result = compare_methods(
            val_probs, val_labels, methods=parse_methods(FEW),
            test_probs=probs, test_labels=labels, n_boot=100,
        )  # fmt: skip
        choices.append((result.recommended, [r.eligible for r in result.results], result.raw_cv))
    assert choices[0] == choices[1] == choices[2]


def test_bad_arguments():
    probs = np.full((20, 4), 0.25)
    labels = np.arange(20) % 4
    with pytest.raises(CnnbalError, match="--methods: unknown method 'spline'"):
        parse_methods("class-dro,spline")
    with pytest.raises(CnnbalError, match="named twice"):
        parse_methods("naive,naive")
    with pytest.raises(CnnbalError, match="--objective"):
        compare_methods(probs, labels, objective="best")
    with pytest.raises(CnnbalError, match="TEST has 3 classes"):
        compare_methods(probs, labels, test_probs=np.full((5, 3), 1 / 3), test_labels=labels[:5])


# ---------------------------------------------------------------- the command


def test_cli_table_fits_100_columns_in_a_pipe(tmp_path):
    result = run(
        "compare", SAMPLE / "val.parquet", "--test", SAMPLE / "test.parquet",
        "--bootstrap", "200",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # the table fits 100 columns; the sentences under it are not cut (CI logs grep them)
    table = lines[: next(i for i, line in enumerate(lines) if line.startswith("cv: mean"))]
    assert max(len(line) for line in table) <= 100
    assert any(line.startswith("Recommended (VAL only, best CV worst20") for line in lines)
    text = result.stdout
    for method in METHOD_NAMES:
        assert method in text
    words = " ".join(text.split())
    assert "Recommended (VAL only, best CV worst20" in words
    assert "TEST was not used for any choice" in words
    assert "\x1b[" not in text  # no colour codes in a pipe


def test_cli_without_test_and_the_json_object(tmp_path, sample):
    result = run("compare", SAMPLE / "val.npz", "--methods", FEW, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["n_test"] is None and payload["raw_test"] is None and payload["test"] is None
    assert set(payload) >= {
        "objective", "max_total_drop", "n_folds", "seed", "n_val", "n_classes", "raw_cv",
        "recommended", "methods", "seconds", "val", "output", "plot",
    }  # fmt: skip
    assert [m["method"] for m in payload["methods"]] == FEW.split(",")
    entry = payload["methods"][2]
    assert entry["kind"] == "logit_bias" and entry["test"] is None
    assert set(entry["cv_estimate"]) >= {"raw", "corrected", "change", "fold_scores"}
    assert entry["cv_estimate"]["raw"] == payload["raw_cv"]
    change = entry["cv_estimate"]["change"]["worst20_accuracy"]
    assert change == pytest.approx(
        entry["cv_estimate"]["corrected"]["worst20_accuracy"]
        - payload["raw_cv"]["worst20_accuracy"]
    )
    assert sum(m["recommended"] for m in payload["methods"]) == 1
    # the human table without TEST has no test columns
    human = run("compare", SAMPLE / "val.npz", "--methods", FEW)
    assert "test" not in human.stdout.splitlines()[1] and "cv" in human.stdout.splitlines()[1]


def test_cli_with_test_json_and_o_writes_what_evaluate_confirms(tmp_path):
    result = run(
        "compare", SAMPLE / "val.npz", "--test", SAMPLE / "test.npz", "--methods", FEW,
        "--bootstrap", "200", "-o", tmp_path / "best.npz", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    best = next(m for m in payload["methods"] if m["recommended"])
    assert payload["output"] == str(tmp_path / "best.npz")
    for name in TEST_METRICS:
        metric = best["test"]["metrics"][name]
        assert set(metric) == {"raw", "corrected", "change", "ci95"} and len(metric["ci95"]) == 2
    artifact = load_artifact(tmp_path / "best.npz")
    assert artifact.method == best["method"]
    assert artifact.provenance["compare"]["recommended"] == best["method"]
    evaluated = json.loads(
        run("evaluate", SAMPLE / "test.npz", "-H", tmp_path / "best.npz", "--json").stdout
    )
    for name in TEST_METRICS:
        assert evaluated["metrics"][name]["corrected"] == pytest.approx(
            best["test"]["metrics"][name]["corrected"], abs=1e-12
        )


def test_o_writes_nothing_and_exits_1_when_no_method_beats_raw(tmp_path):
    # temperature scaling never changes a prediction: it cannot beat raw
    result = run(
        "compare", SAMPLE / "val.npz", "--methods", "temperature", "-o", tmp_path / "C.npz"
    )
    assert result.exit_code == 1
    assert "none beats the raw outputs" in " ".join(result.stdout.split())
    assert "Nothing written" in result.stderr and not (tmp_path / "C.npz").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "naive,spline"], "--methods: unknown method 'spline'"),
        (["--folds", "1"], "--folds: need at least 2 folds"),
        (["--max-total-drop", "-1"], "--max-total-drop: must be >= 0"),
        (["-o", SAMPLE / "val.npz"], "refusing to overwrite the input file"),
        (["--test", SAMPLE / "missing.npz"], "missing.npz"),
    ],
)
def test_cli_errors_are_one_line_exit_2(args, message):
    result = run("compare", SAMPLE / "val.npz", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = run(
        "compare", SAMPLE / "val.npz", "--test", SAMPLE / "test.npz", "--methods", FEW,
        "--bootstrap", "100", "--plot", tmp_path / "compare.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_through_a_real_subprocess(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cnnbal", "compare", str(SAMPLE / "val.npz"),
         "--methods", "logit-adjust,class-dro", "--test", str(SAMPLE / "test.npz"),
         "--bootstrap", "100"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    table = lines[: next(i for i, line in enumerate(lines) if line.startswith("cv: mean"))]
    assert max(len(line) for line in table) <= 100
    assert any(line.startswith("Recommended (VAL only") for line in lines)
