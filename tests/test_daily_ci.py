"""CI gates on any metric, usage errors, and JSON on stdout for every failure (issue 10, item 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnbal.cli import app
from cnnbal.metrics import METRIC_NAMES
from tests.conftest import make_outputs, write_parquet

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def fitted(tmp_path):
    probs, labels = make_outputs(1200, 6, seed=21)
    val = write_parquet(tmp_path / "val.parquet", probs[:600], labels[:600])
    test = write_parquet(tmp_path / "test.parquet", probs[600:], labels[600:])
    assert run("fit", "--force", val, "-o", tmp_path / "H.npz").exit_code == 0
    payload = json.loads(run("evaluate", test, "-H", tmp_path / "H.npz", "--json").stdout)
    return tmp_path, test, payload["metrics"]


def _change(metrics, name):
    return 100 * (metrics[name]["corrected"] - metrics[name]["raw"])


@pytest.mark.parametrize("metric", METRIC_NAMES)
def test_min_gain_and_max_drop_gate_any_metric_at_its_change(fitted, metric):
    tmp, test, metrics = fitted
    change = _change(metrics, metric)
    gain = -change if metric == "squared_error" else change  # lower is better
    h = ["-H", tmp / "H.npz"]
    assert run("evaluate", test, *h, "--min-gain", f"{metric}={gain - 0.01}").exit_code == 0
    assert run("evaluate", test, *h, "--min-gain", f"{metric}={gain + 0.01}").exit_code == 1
    assert run("evaluate", test, *h, "--max-drop", f"{metric}={-gain + 0.01}").exit_code == 0
    assert run("evaluate", test, *h, "--max-drop", f"{metric}={-gain - 0.01}").exit_code == 1


def test_gates_repeat_and_report_each_in_json(fitted):
    tmp, test, metrics = fitted
    result = run(
        "evaluate", test, "-H", tmp / "H.npz", "--json",
        "--min-gain", "worst20_accuracy=0", "--min-gain", "balanced=1000",
        "--max-drop", "total_accuracy=0.5", "--max-total-drop", "0.5",
    )  # fmt: skip
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    checks = {(c["flag"], c["metric"]): c for c in payload["checks"]}
    assert set(checks) == {
        ("--min-gain", "worst20_accuracy"),
        ("--min-gain", "balanced_accuracy"),
        ("--max-drop", "total_accuracy"),
        ("--max-total-drop", "total_accuracy"),
    }
    assert payload["passed"] is False
    assert not checks[("--min-gain", "balanced_accuracy")]["passed"]
    worst = checks[("--min-gain", "worst20_accuracy")]
    assert worst["change_pts"] == pytest.approx(_change(metrics, "worst20_accuracy"))
    assert "FAILED: balanced_accuracy" in result.stderr


def test_messages_read_right_for_rises_and_falls(fitted):
    tmp, test, metrics = fitted
    total = _change(metrics, "total_accuracy")
    result = run("evaluate", test, "-H", tmp / "H.npz", "--max-total-drop", "100")
    line = next(x for x in result.stderr.splitlines() if "total_accuracy" in x)
    verb = "rose" if total > 0 else "fell"
    assert f"ok: total_accuracy {verb} {abs(total):.2f} pts" in line
    assert "-" not in line.split("pts")[0]  # never "dropped -1.78"
    squared = run("evaluate", test, "-H", tmp / "H.npz", "--min-gain", "squared_error=0")
    assert "(lower is better)" in squared.stderr


def test_shorthands_say_which_metric_they_gate():
    help_text = CliRunner().invoke(app, ["evaluate", "--help"], env={"COLUMNS": "300"}).stdout
    flat = " ".join(help_text.split())
    assert "--max-drop total_accuracy=PTS" in flat
    assert "--min-gain low20_accuracy=PTS" in flat
    assert "METRIC=PTS" in flat


def test_a_gate_without_h_is_a_usage_error(fitted):
    _, test, _ = fitted
    for flags in (["--min-gain", "worst20_accuracy=1"], ["--max-total-drop", "1"]):
        result = run("evaluate", test, *flags)
        assert result.exit_code == 2
        assert "needs -H" in result.stderr


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("worst20_accuracy", "expected METRIC=PTS"),
        ("worst20_accuracy=lots", "expected METRIC=PTS"),
        ("accuracy=1", "unknown metric 'accuracy'; one of total_accuracy"),
        ("total_accuracy=nan", "expected METRIC=PTS"),
    ],
)
def test_bad_gates_are_usage_errors(fitted, flag, message):
    tmp, test, _ = fitted
    result = run("evaluate", test, "-H", tmp / "H.npz", "--min-gain", flag)
    assert result.exit_code == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["fit", "{missing}"],
        ["apply", "{h}", "{missing}", "-o", "{out}"],
        ["evaluate", "{missing}"],
        ["evaluate", "{test}", "--min-gain", "worst20=1"],
        ["info", "{missing}"],
        ["sweep", "{missing}"],
    ],
)
def test_json_prints_the_error_on_stdout(fitted, command):
    tmp, test, _ = fitted
    values = {"missing": tmp / "nope.npz", "h": tmp / "H.npz", "out": tmp / "o.parquet"}
    values["test"] = test
    args = [a.format(**values) if a.startswith("{") else a for a in command]
    result = run(*args, "--json")
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == 2
    assert payload["error"] and result.stderr.startswith(f"error: {payload['error']}")


def test_ci_script_gating_on_worst20_passes_on_sample_data_and_fails_at_50(tmp_path):
    """Must show: the README's CI step, as a real shell script, on the bundled data."""
    script = tmp_path / "ci.sh"
    script.write_text(
        "set -eu\n"
        'cnnbal() { "$PYTHON" -m cnnbal "$@"; }\n'
        'cnnbal fit "$SAMPLE/val.parquet" -o "$WORK/H.npz" --quiet\n'
        'cnnbal evaluate "$SAMPLE/test.parquet" -H "$WORK/H.npz" --quiet \\\n'
        '  --min-gain "worst20_accuracy=$GAIN" --max-drop total_accuracy=0.5 \\\n'
        '  --json > "$WORK/eval.json"\n'
    )
    env = {**os.environ, "PYTHON": sys.executable, "SAMPLE": str(SAMPLE), "WORK": str(tmp_path)}
    passed = subprocess.run(
        ["bash", str(script)], env={**env, "GAIN": "0.5"}, capture_output=True, text=True
    )
    assert passed.returncode == 0, passed.stderr
    assert passed.stderr == ""  # --quiet: nothing but failures
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["passed"] is True
    gain = report["checks"][0]["gain_pts"]
    assert 0.5 < gain < 50  # 62.69% -> 74.17% on the sample data
    failed = subprocess.run(
        ["bash", str(script)], env={**env, "GAIN": "50"}, capture_output=True, text=True
    )
    assert failed.returncode == 1
    assert "FAILED: worst20_accuracy rose" in failed.stderr
    assert "required: a gain of at least 50 pts" in failed.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["passed"] is False


def test_usage_errors_from_the_parser_still_exit_2(fitted):
    _, test, _ = fitted
    result = run("evaluate", test, "--max-total-drop", "lots")
    assert result.exit_code == 2
    assert "--max-total-drop" in result.output


def test_a_parser_usage_error_with_json_is_json_on_stdout_too(tmp_path):
    """A real subprocess: the console script's own handling of a bad flag value."""
    result = subprocess.run(
        [sys.executable, "-m", "cnnbal", "evaluate", tmp_path / "t.npz",
         "--max-total-drop", "lots", "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == 2 and "--max-total-drop" in payload["error"]
    assert "--max-total-drop" in result.stderr
