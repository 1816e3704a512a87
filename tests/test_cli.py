"""The command line, driven end to end (CliRunner, and once as a real subprocess)."""

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
from cnnbal.core import apply_correction, fit_elaborated
from tests.conftest import make_outputs, write_csv, write_parquet

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


@pytest.fixture
def files(tmp_path):
    probs, labels = make_outputs(1200, 6, seed=11)
    val = write_parquet(
        tmp_path / "val.parquet",
        probs[:600],
        labels[:600],
        class_names=list("abcdef"),
        extra={"id": np.arange(600)},
    )
    test = write_parquet(
        tmp_path / "test.parquet",
        probs[600:],
        labels[600:],
        class_names=list("abcdef"),
        extra={"id": np.arange(600, 1200), "path": [f"img{i}.png" for i in range(600)]},
    )
    return tmp_path, val, test, probs, labels


def test_fit_writes_artifact_equal_to_api(files):
    tmp, val, _, probs, labels = files
    result = run("fit", "--force", val, "-o", tmp / "H.npz", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    art = load_artifact(tmp / "H.npz")
    expected = fit_elaborated(probs[:600], labels[:600]).H
    np.testing.assert_allclose(art.H, expected, atol=1e-12)
    assert summary["n_classes"] == 6 and summary["n_val"] == 600
    assert summary["n_competitive"] == art.n_competitive > 0
    assert summary["class_names"] == list("abcdef")
    assert summary["params"] == {"alpha": 3.0, "beta": 1.5, "r_high": 0.8, "r_low": 0.1}
    assert art.input_name == "val.parquet" and len(art.input_sha256) == 64


def test_fit_flags_reach_the_fit(files):
    tmp, val, *_ = files
    result = run(
        "fit", "--force", val, "-o", tmp / "H.npz",
        "--r-low", "0.05", "--r-high", "0.9", "--beta", "2", "--alpha", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    art = load_artifact(tmp / "H.npz")
    assert art.params == {"r_low": 0.05, "r_high": 0.9, "beta": 2.0, "alpha": 4.0}
    assert art.apply_gate == 0.9
    assert "competitive" in result.stdout
    naive = run("fit", "--force", val, "-o", tmp / "N.npz", "--method", "naive")
    assert naive.exit_code == 0 and load_artifact(tmp / "N.npz").method == "naive"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "magic"], "--method must be one of elaborated, naive"),
        (["--r-low", "0.9"], "--r-low (0.9) must be below --r-high (0.8)"),
        (["--alpha", "0"], "--alpha must be a finite number > 0"),
    ],
)
def test_fit_bad_flags(files, flags, message):
    tmp, val, *_ = files
    result = run("fit", "--force", val, "-o", tmp / "H.npz", *flags)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp / "H.npz").exists()


def test_evaluate_json_metrics(files):
    tmp, val, test, probs, labels = files
    run("fit", "--force", val, "-o", tmp / "H.npz")
    result = run("evaluate", test, "-H", tmp / "H.npz", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    metrics = payload["metrics"]
    expected = {
        "total_accuracy", "low20_accuracy", "low20_val_accuracy", "worst20_accuracy",
        "balanced_accuracy", "worst_class_accuracy", "macro_f1", "squared_error",
    }  # fmt: skip
    assert set(metrics) == expected
    raw_pred = probs[600:].argmax(axis=1)
    H = fit_elaborated(probs[:600], labels[:600]).H
    new_pred = apply_correction(H, probs[600:], 0.8).argmax(axis=1)
    assert metrics["total_accuracy"]["raw"] == pytest.approx(np.mean(raw_pred == labels[600:]))
    assert metrics["total_accuracy"]["corrected"] == pytest.approx(
        np.mean(new_pred == labels[600:])
    )
    for name in expected - {"squared_error"}:
        for side in ("raw", "corrected"):
            assert 0.0 <= metrics[name][side] <= 1.0
    fixed = int(np.sum((raw_pred != labels[600:]) & (new_pred == labels[600:])))
    assert payload["changed"]["fixed"] == fixed
    assert len(payload["per_class"]) == 6 and payload["per_class"][0]["name"] == "a"
    assert payload["passed"] is True


def test_evaluate_table_and_per_class(files):
    tmp, val, test, *_ = files
    run("fit", "--force", val, "-o", tmp / "H.npz")
    result = run("evaluate", test, "-H", tmp / "H.npz", "--per-class")
    assert result.exit_code == 0
    for text in ("total accuracy", "low-20% (paper)", "worst-20% mean", "per-class accuracy"):
        assert text in result.stdout
    raw_only = run("evaluate", test)
    assert raw_only.exit_code == 0 and "no H: raw only" in raw_only.stdout


def test_evaluate_ci_gates(files):
    tmp, val, test, *_ = files
    run("fit", "--force", val, "-o", tmp / "H.npz")
    payload = json.loads(run("evaluate", test, "-H", tmp / "H.npz", "--json").stdout)
    total = payload["metrics"]["total_accuracy"]
    low20 = payload["metrics"]["low20_accuracy"]
    drop = 100 * (total["raw"] - total["corrected"])
    gain = 100 * (low20["corrected"] - low20["raw"])
    ok = run("evaluate", test, "-H", tmp / "H.npz", "--max-total-drop", drop + 0.5,
             "--min-low20-gain", gain - 0.5)  # fmt: skip
    assert ok.exit_code == 0, ok.output
    too_greedy = run("evaluate", test, "-H", tmp / "H.npz", "--min-low20-gain", gain + 1)
    assert too_greedy.exit_code == 1
    assert "FAILED: low20_accuracy rose" in too_greedy.stderr
    strict = run("evaluate", test, "-H", tmp / "H.npz", "--max-total-drop", drop - 1, "--json")
    assert strict.exit_code == 1
    assert json.loads(strict.stdout)["passed"] is False


def test_apply_parquet_streams_passthrough_and_pred(files):
    tmp, val, test, probs, labels = files
    run("fit", "--force", val, "-o", tmp / "H.npz")
    result = run("apply", tmp / "H.npz", test, "-o", tmp / "out.parquet")
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp / "out.parquet")
    assert table.column_names == ["id", "path", "label", "pred", "pred_name", "probs"]
    assert table.column("path").to_pylist()[:2] == ["img0.png", "img1.png"]
    np.testing.assert_array_equal(table.column("label").to_numpy(), labels[600:])
    corrected = np.stack(table.column("probs").to_numpy(zero_copy_only=False))
    H = load_artifact(tmp / "H.npz").H
    np.testing.assert_allclose(corrected, apply_correction(H, probs[600:], 0.8), atol=1e-6)
    np.testing.assert_array_equal(table.column("pred").to_numpy(), corrected.argmax(axis=1))
    assert json.loads(table.schema.metadata[b"cnnbal.class_names"]) == list("abcdef")
    # the applied file is itself a valid input: evaluating it raw shows the corrected metrics
    again = json.loads(run("evaluate", tmp / "out.parquet", "--json").stdout)
    direct = json.loads(run("evaluate", test, "-H", tmp / "H.npz", "--json").stdout)
    assert again["metrics"]["total_accuracy"]["raw"] == pytest.approx(
        direct["metrics"]["total_accuracy"]["corrected"]
    )


def test_apply_json_report_counts(tmp_path):
    probs, labels = make_outputs(3000, 8, seed=21)
    np.savez(tmp_path / "val.npz", probs=probs[:1000], labels=labels[:1000])
    run("fit", "--force", tmp_path / "val.npz", "-o", tmp_path / "H.npz")
    write_parquet(tmp_path / "t.parquet", probs[1000:], labels[1000:], layout="p_")
    result = run("apply", tmp_path / "H.npz", tmp_path / "t.parquet", "-o",
                 tmp_path / "o.parquet", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    corrected = apply_correction(load_artifact(tmp_path / "H.npz").H, probs[1000:], 0.8)
    assert report["rows"] == 2000
    assert report["corrected"] == int(np.sum(probs[1000:].max(axis=1) < 0.8))
    changed = int(np.sum(corrected.argmax(axis=1) != probs[1000:].argmax(axis=1)))
    assert report["changed_predictions"] == changed > 0


def test_apply_list_column_to_csv_writes_flat_columns(files):
    import pyarrow.csv as pacsv

    tmp, val, test, probs, _ = files
    run("fit", "--force", val, "-o", tmp / "H.npz")
    result = run("apply", tmp / "H.npz", test, "-o", tmp / "out.csv")
    assert result.exit_code == 0, result.output
    table = pacsv.read_csv(tmp / "out.csv")
    assert table.column_names == ["id", "path", "label", "pred", "pred_name"] + [
        f"p_{j}" for j in range(6)
    ]
    expected = apply_correction(load_artifact(tmp / "H.npz").H, probs[600:], 0.8)
    np.testing.assert_allclose(table.column("p_5").to_numpy(), expected[:, 5], atol=1e-6)


def test_apply_raw_scores_can_be_negative(files):
    tmp, val, test, *_ = files
    run("fit", "--force", val, "-o", tmp / "H.npz")
    run("apply", tmp / "H.npz", test, "-o", tmp / "raw.parquet", "--raw-scores")
    scores = np.stack(pq.read_table(tmp / "raw.parquet").column("probs").to_numpy(False))
    assert scores.min() < 0
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)


def test_apply_prefix_columns_csv_npz_npy(tmp_path):
    probs, labels = make_outputs(900, 5, seed=3)
    H_path = tmp_path / "H.npz"
    np.savez(tmp_path / "val.npz", probs=probs[:450], labels=labels[:450])
    assert run("fit", "--force", tmp_path / "val.npz", "-o", H_path).exit_code == 0
    expected = apply_correction(load_artifact(H_path).H, probs[450:], 0.8)

    write_parquet(tmp_path / "t.parquet", probs[450:], labels[450:], layout="p_")
    assert run("apply", H_path, tmp_path / "t.parquet", "-o", tmp_path / "o.parquet").exit_code == 0
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.column_names == ["label", "pred"] + [f"p_{j}" for j in range(5)]
    got = np.column_stack([table.column(f"p_{j}").to_numpy() for j in range(5)])
    np.testing.assert_allclose(got, expected, atol=1e-6)

    write_csv(tmp_path / "t.csv", probs[450:], labels[450:])
    assert run("apply", H_path, tmp_path / "t.csv", "-o", tmp_path / "o.csv").exit_code == 0
    import pyarrow.csv as pacsv

    got = pacsv.read_csv(tmp_path / "o.csv")
    np.testing.assert_allclose(got.column("p_3").to_numpy(), expected[:, 3], atol=1e-6)

    np.savez(tmp_path / "t.npz", probs=probs[450:], labels=labels[450:])
    assert run("apply", H_path, tmp_path / "t.npz", "-o", tmp_path / "o.npz").exit_code == 0
    with np.load(tmp_path / "o.npz", allow_pickle=False) as out:
        np.testing.assert_allclose(out["probs"], expected, atol=1e-6)
        np.testing.assert_array_equal(out["pred"], expected.argmax(axis=1))
        np.testing.assert_array_equal(out["labels"], labels[450:])

    np.save(tmp_path / "t.npy", probs[450:])
    assert run("apply", H_path, tmp_path / "t.npy", "-o", tmp_path / "o.npy").exit_code == 0
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), expected, atol=1e-6)


def test_apply_failure_midway_leaves_no_output(tmp_path):
    probs, labels = make_outputs(70_000, 3, seed=1)
    np.savez(tmp_path / "val.npz", probs=probs[:5000], labels=labels[:5000])
    run("fit", "--force", tmp_path / "val.npz", "-o", tmp_path / "H.npz")
    probs[69_000, 0] = np.nan  # in the second block of 65,536 rows
    np.save(tmp_path / "big.npy", probs)
    (tmp_path / "out.npy").write_bytes(b"old")
    result = run("apply", tmp_path / "H.npz", tmp_path / "big.npy", "-o", tmp_path / "out.npy")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: big.npy: non-finite value nan at row 69000, column 0"
    assert (tmp_path / "out.npy").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["H.npz", "big.npy", "out.npy", "val.npz"]


def test_apply_npz_failure_midway_writes_nothing(tmp_path, monkeypatch):
    probs, labels = make_outputs(200, 3, seed=4)
    np.savez(tmp_path / "val.npz", probs=probs, labels=labels)
    run("fit", "--force", tmp_path / "val.npz", "-o", tmp_path / "H.npz")
    np.savez(tmp_path / "t.npz", probs=probs, labels=labels)
    saved = []
    monkeypatch.setattr(np, "savez", lambda *a, **k: saved.append(a))
    import cnnbal.pipeline
    from cnnbal.corrections import Correction

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Correction, "apply_predict", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cnnbal.pipeline.apply_file(tmp_path / "H.npz", tmp_path / "t.npz", tmp_path / "o.npz")
    assert saved == []  # the sink did not assemble an archive for a failed run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["H.npz", "t.npz", "val.npz"]


def test_apply_refuses_to_overwrite_input_and_wrong_family(files):
    tmp, val, test, *_ = files
    run("fit", "--force", val, "-o", tmp / "H.npz")
    before = test.read_bytes()
    result = run("apply", tmp / "H.npz", test, "-o", test)
    assert result.exit_code == 2 and "refusing to overwrite the input" in result.stderr
    assert test.read_bytes() == before
    result = run("apply", tmp / "H.npz", test, "-o", tmp / "x.npz")
    assert result.exit_code == 2 and "write a table input to .parquet or .csv" in result.stderr


def test_class_count_mismatch(files, tmp_path):
    tmp, val, *_ = files
    run("fit", "--force", val, "-o", tmp / "H.npz")
    probs, labels = make_outputs(100, 4)
    np.savez(tmp / "four.npz", probs=probs, labels=labels)
    for args in (
        ["evaluate", tmp / "four.npz", "-H", tmp / "H.npz"],
        ["apply", tmp / "H.npz", tmp / "four.npz", "-o", tmp / "o.npz"],
    ):
        result = run(*args)
        assert result.exit_code == 2
        assert "four.npz: 4 classes, but H.npz was fitted for 6" in result.stderr


def test_class_names_mismatch(files):
    tmp, val, _, probs, labels = files
    run("fit", "--force", val, "-o", tmp / "H.npz")
    write_parquet(tmp / "other.parquet", probs, labels, class_names=list("abcdxf"))
    result = run("evaluate", tmp / "other.parquet", "-H", tmp / "H.npz")
    assert result.exit_code == 2
    assert "class names differ from H.npz at class 4 ('x' vs 'e')" in result.stderr


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: np.savez(d / "f.npz", probs=np.array([[0.5, 0.5]]), labels=np.array([3])),
         "f.npz: label 3 out of range"),
        (lambda d: np.savez(d / "f.npz", probs=np.array([[0.7, 0.7]]), labels=np.array([0])),
         "f.npz: row 0 sums to 1.4"),
        (lambda d: (d / "f.npz").write_bytes(b"nope"), "f.npz: not a readable .npz"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2(tmp_path, setup, message):
    setup(tmp_path)
    result = run("fit", "--force", tmp_path / "f.npz", "-o", tmp_path / "H.npz")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "H.npz").exists()


def test_info(files):
    tmp, val, *_ = files
    run("fit", "--force", val, "-o", tmp / "H.npz")
    result = run("info", tmp / "H.npz", "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["format"] == "cnnbal-h" and info["method"] == "elaborated"
    assert info["input_name"] == "val.parquet" and info["n_classes"] == 6
    table = run("info", tmp / "H.npz")
    assert "elaborated" in table.stdout and "val.parquet" in table.stdout
    np.savez(tmp / "foreign.npz", x=np.ones(2))
    bad = run("info", tmp / "foreign.npz")
    assert bad.exit_code == 2 and "not a cnnbal H artifact" in bad.stderr


def test_fit_warns_about_zero_accuracy_class(tmp_path):
    probs, labels = make_outputs(400, 4, seed=2)
    probs[labels == 3] = np.array([0.1, 0.1, 0.45, 0.35], dtype=np.float32)
    np.savez(tmp_path / "v.npz", probs=probs, labels=labels)
    result = run("fit", "--force", tmp_path / "v.npz", "-o", tmp_path / "H.npz")
    assert result.exit_code == 0
    assert "warning: 1 class(es) with zero validation accuracy" in result.stderr


def test_version_and_help():
    assert run("--version").stdout.strip().startswith("cnnbal ")
    helptext = run("--help").stdout
    for command in ("fit", "apply", "evaluate", "info", "sweep", "extract"):
        assert command in helptext


def test_subprocess_quickstart_on_sample_data(tmp_path):
    env = {**os.environ, "COLUMNS": "120"}
    fit = subprocess.run(
        [sys.executable, "-m", "cnnbal", "fit", SAMPLE / "val.parquet", "-o", tmp_path / "H.npz"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    evaluate = subprocess.run(
        [sys.executable, "-m", "cnnbal", "evaluate", SAMPLE / "test.parquet",
         "-H", tmp_path / "H.npz", "--json", "--min-low20-gain", "1"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr
    metrics = json.loads(evaluate.stdout)["metrics"]
    # the bundled data shows the effect: weak classes up, overall not down
    assert metrics["worst20_accuracy"]["corrected"] > metrics["worst20_accuracy"]["raw"]
    assert metrics["balanced_accuracy"]["corrected"] >= metrics["balanced_accuracy"]["raw"]
    bad = subprocess.run(
        [sys.executable, "-m", "cnnbal", "evaluate", tmp_path / "missing.npz"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stdout == ""


def test_npz_and_parquet_sample_files_agree():
    a = json.loads(run("evaluate", SAMPLE / "test.npz", "--json").stdout)["metrics"]
    b = json.loads(run("evaluate", SAMPLE / "test.parquet", "--json").stdout)["metrics"]
    assert a == b


def test_os_error_is_one_line_exit_2(files):
    tmp, val, test, *_ = files
    run("fit", "--force", val, "-o", tmp / "H.npz")
    (tmp / "taken.parquet").mkdir()  # the output path is a directory: rename fails
    result = run("apply", tmp / "H.npz", test, "-o", tmp / "taken.parquet")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "directory" in lines[0]
    assert not [p for p in tmp.iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_exits_130_without_traceback(files, monkeypatch):
    tmp, val, *_ = files
    import cnnbal.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cnnbal.pipeline, "fit_dataset", interrupted)  # what `fit` calls
    result = run("fit", "--force", val, "-o", tmp / "H.npz")
    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted"
    assert not (tmp / "H.npz").exists()
