"""`cnnbal fit --method` for every kind of correction, end to end on the bundled sample data:
fit -> apply -> evaluate -> info, against the Python API computed independently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cnnbal.artifact import load_artifact
from cnnbal.cli import app
from cnnbal.methods import fit_method
from cnnbal.metrics import compare
from cnnbal.pipeline import fit_file

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# one method of each kind (affine has its own tests in test_cli.py)
ROUND_TRIPS = {
    "class-dro": "logit_bias",
    "prior-match": "logit_bias",
    "temperature": "temperature",
    "vector-scaling": "vector_scaling",
    "naive": "affine",
}


@pytest.mark.parametrize("method", sorted(ROUND_TRIPS))
def test_fit_apply_evaluate_info_round_trip(tmp_path, sample, method):
    val_probs, val_labels, test_probs, test_labels = sample
    fitted = run("fit", SAMPLE / "val.parquet", "--method", method, "-o", tmp_path / "C.npz")
    assert fitted.exit_code == 0, fitted.output
    artifact = load_artifact(tmp_path / "C.npz")
    assert artifact.kind == ROUND_TRIPS[method] and artifact.method == method
    # the same fit through the Python API, with the same (default) CV
    expected = fit_method(method, val_probs, val_labels)
    assert artifact.correction == expected.correction
    assert artifact.class_names == [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"
    ]  # fmt: skip

    applied = run("apply", tmp_path / "C.npz", SAMPLE / "test.parquet", "-o", tmp_path / "o.pq")
    assert applied.exit_code == 0, applied.output
    table = pq.read_table(tmp_path / "o.pq")
    corrected = np.stack(table.column("probs").to_numpy(zero_copy_only=False))
    by_api = expected.correction.apply(test_probs)
    np.testing.assert_allclose(corrected, by_api, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(table.column("pred").to_numpy(), by_api.argmax(axis=1))
    # every kind here touches every row (naive H has no gate)
    assert "450 rows, 450 touched by the correction" in applied.stderr

    evaluated = run("evaluate", SAMPLE / "test.parquet", "-H", tmp_path / "C.npz", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)["metrics"]
    independent = compare(
        test_probs, by_api, test_labels, val_class_accuracy=expected.class_accuracy
    ).metrics
    for name in ("total_accuracy", "worst20_accuracy", "low20_val_accuracy"):
        assert metrics[name]["corrected"] == pytest.approx(independent[name][1], abs=1e-12)

    info = run("info", tmp_path / "C.npz", "--json")
    summary = json.loads(info.stdout)
    assert summary["kind"] == ROUND_TRIPS[method] and summary["method"] == method
    assert summary["params"] == {k: v for k, v in expected.hyper.items()}
    human = run("info", tmp_path / "C.npz").stdout
    assert "kind" in human and ROUND_TRIPS[method] in human


def test_fit_says_which_value_cv_chose_and_its_score(tmp_path, sample):
    val_probs, val_labels, *_ = sample
    result = run("fit", SAMPLE / "val.npz", "--method", "logit-adjust", "-o", tmp_path / "C.npz")
    assert result.exit_code == 0, result.output
    expected = fit_method("logit-adjust", val_probs, val_labels)
    tau = expected.hyper["tau"]
    cv = expected.cv
    i = cv["grid"].index(tau)
    score = 100 * cv["mean_scores"]["worst20_accuracy"][i]
    raw = 100 * cv["raw_mean_scores"]["worst20_accuracy"]
    assert (
        f"tau={tau:g} chosen by 5-fold CV: worst20 {score:.2f}% vs raw {raw:.2f}%" in result.stdout
    )
    info = json.loads(run("info", tmp_path / "C.npz", "--json").stdout)
    assert info["hyper_choice"].startswith(f"tau={tau:g} chosen by 5-fold CV on worst20 from ")
    assert info["provenance"]["cv"]["chosen"] == tau


def test_a_given_hyper_parameter_is_used_without_cv(tmp_path, sample):
    val_probs, val_labels, *_ = sample
    result = run(
        "fit", SAMPLE / "val.npz", "--method", "class-dro", "--eta", "0.5",
        "-o", tmp_path / "C.npz", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["hyper"] == {"eta": 0.5} and payload["chosen_by_cv"] is False
    assert payload["cv"] is None and "chosen by" not in result.stderr
    expected = fit_method("class-dro", val_probs, val_labels, hyper={"eta": 0.5})
    assert load_artifact(tmp_path / "C.npz").correction == expected.correction


def test_cv_flags_reach_the_choice(tmp_path, sample):
    val_probs, val_labels, *_ = sample
    result = run(
        "fit", SAMPLE / "val.npz", "--method", "class-balanced-ce", "--folds", "3",
        "--seed", "4", "--objective", "balanced", "--max-total-drop", "0", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cv = json.loads(result.stdout)["cv"]
    assert (cv["n_folds"], cv["seed"], cv["objective"], cv["max_total_drop"]) == (
        3, 4, "balanced", 0.0
    )  # fmt: skip
    expected = fit_method(
        "class-balanced-ce", val_probs, val_labels, n_folds=3, seed=4,
        objective="balanced", max_total_drop=0.0,
    )  # fmt: skip
    assert json.loads(result.stdout)["hyper"] == expected.hyper


def test_prior_match_with_a_prior_file_and_without_labels(tmp_path, sample):
    val_probs, val_labels, *_ = sample
    weights = np.arange(1.0, 11.0)
    (tmp_path / "prior.txt").write_text("\n".join(f"{w:g}" for w in weights))
    # a prior this far from the balanced labels costs 17 points: the fit check refuses it
    # without --force (the given temperature is not chosen by CV)
    args = ["fit", SAMPLE / "val.npz", "--method", "prior-match", "--prior", tmp_path / "prior.txt",
            "--temperature", "1", "-o", tmp_path / "P.npz"]  # fmt: skip
    assert run(*args).exit_code == 1 and not (tmp_path / "P.npz").exists()
    result = run(*args, "--force")
    assert result.exit_code == 0, result.output
    expected = fit_method(
        "prior-match", val_probs, val_labels, prior=weights / weights.sum(),
        hyper={"temperature": 1.0},
    )  # fmt: skip
    artifact = load_artifact(tmp_path / "P.npz")
    assert artifact.correction == expected.correction
    assert artifact.provenance["prior"] == str(tmp_path / "prior.txt")
    # the mean corrected output matches the prior (what prior matching means)
    mean = artifact.correction.apply(val_probs.astype(np.float64)).mean(axis=0)
    np.testing.assert_allclose(mean, weights / weights.sum(), atol=1e-5)

    np.savez(tmp_path / "unlabelled.npz", probs=val_probs)
    result = run(
        "fit", tmp_path / "unlabelled.npz", "--method", "prior-match", "--unlabelled",
        "-o", tmp_path / "U.npz",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fitted without labels" in result.stdout
    unlabelled = load_artifact(tmp_path / "U.npz")
    assert np.isnan(unlabelled.val_class_accuracy).all()
    assert unlabelled.correction == fit_method("prior-match", val_probs, unlabelled=True).correction


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "spline"], "--method must be one of elaborated, naive, logit-adjust"),
        (
            ["--method", "logit-adjust", "--eta", "1"],
            "--eta applies to class-dro, not logit-adjust",
        ),
        (["--method", "class-dro", "--beta", "2"], "--beta applies to the elaborated fit"),
        (["--method", "class-dro", "--unlabelled"], "--unlabelled applies to prior-match"),
        (["--method", "naive", "--prior", "val"], "--prior applies to prior-match"),
        (["--method", "class-dro", "--folds", "1"], "--folds: need at least 2 folds"),
        (["--method", "class-dro", "--eta", "-1"], "eta"),
        (["--method", "prior-match", "--prior", "missing.txt"], "missing.txt: no such file"),
        (["--method", "class-dro", "--max-total-drop", "-1"], "--max-total-drop: must be >= 0"),
    ],
)
def test_bad_method_flags_are_one_line_exit_2(tmp_path, args, message):
    result = run("fit", SAMPLE / "val.npz", *args, "-o", tmp_path / "C.npz")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "C.npz").exists()


def test_a_prior_file_with_the_wrong_count(tmp_path):
    (tmp_path / "prior.txt").write_text("1 2 3")
    result = run(
        "fit", SAMPLE / "val.npz", "--method", "prior-match", "--prior", tmp_path / "prior.txt"
    )
    assert result.exit_code == 2
    assert result.stderr == "error: prior.txt: 3 prior weights, but the outputs have 10\n"


def test_fit_file_api_takes_any_method(tmp_path, sample):
    val_probs, val_labels, *_ = sample
    artifact = fit_file(SAMPLE / "val.npz", tmp_path / "C.npz", method="worst20-ascent")
    assert artifact.kind == "logit_bias"
    assert artifact.correction == fit_method("worst20-ascent", val_probs, val_labels).correction
    assert load_artifact(tmp_path / "C.npz").correction == artifact.correction


def test_raw_scores_leave_a_log_linear_correction_unchanged(tmp_path):
    """--raw-scores is about the affine H's negative scores; other kinds give probabilities."""
    run("fit", SAMPLE / "val.npz", "--method", "class-dro", "-o", tmp_path / "C.npz")
    a = run("apply", tmp_path / "C.npz", SAMPLE / "test.npz", "-o", tmp_path / "a.npz")
    b = run(
        "apply", tmp_path / "C.npz", SAMPLE / "test.npz", "-o", tmp_path / "b.npz", "--raw-scores"
    )
    assert a.exit_code == b.exit_code == 0
    with np.load(tmp_path / "a.npz") as x, np.load(tmp_path / "b.npz") as y:
        np.testing.assert_array_equal(x["probs"], y["probs"])
        assert np.all(x["probs"] >= 0)


def test_subprocess_fit_method_apply_evaluate(tmp_path):
    env = {**os.environ, "COLUMNS": "120"}

    def cnnbal(*args):
        return subprocess.run(
            [sys.executable, "-m", "cnnbal", *map(str, args)],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip

    fitted = cnnbal(
        "fit", SAMPLE / "val.parquet", "--method", "class-dro", "-o", tmp_path / "C.npz"
    )
    assert fitted.returncode == 0, fitted.stderr
    assert "class-dro -> logit_bias" in fitted.stdout and "chosen by 5-fold CV" in fitted.stdout
    applied = cnnbal("apply", tmp_path / "C.npz", SAMPLE / "test.npz", "-o", tmp_path / "t.npz")
    assert applied.returncode == 0, applied.stderr
    evaluated = cnnbal("evaluate", SAMPLE / "test.npz", "-H", tmp_path / "C.npz", "--json")
    metrics = json.loads(evaluated.stdout)["metrics"]
    # on the bundled data the balancing bias lifts the weakest classes
    assert metrics["worst20_accuracy"]["corrected"] > metrics["worst20_accuracy"]["raw"]
    info = cnnbal("info", tmp_path / "C.npz")
    assert info.returncode == 0 and "logit_bias" in info.stdout and "eta" in info.stdout
