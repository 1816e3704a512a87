"""Human output that reads well in CI logs, and one consistent interface (issue 10, items 5-6)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnbal._install import install_hint
from cnnbal.cli import app
from tests.conftest import make_outputs, write_parquet

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
COMMANDS = ("fit", "apply", "evaluate", "info", "sweep")


def run(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def named(tmp_path):
    probs, labels = make_outputs(1200, 6, seed=31)
    names = ["ant", "bee", "cat", "dog", "eel", "fox"]
    val = write_parquet(tmp_path / "val.parquet", probs[:600], labels[:600], class_names=names)
    test = write_parquet(tmp_path / "test.parquet", probs[600:], labels[600:], class_names=names)
    assert run("fit", "--force", val, "-o", tmp_path / "H.npz").exit_code == 0
    return tmp_path, val, test, names


# ---------------------------------------------------------------- 5. human output


def test_piped_output_is_not_hard_wrapped(tmp_path):
    """A real subprocess (stdout and stderr are pipes): long paths stay on one line."""
    deep = tmp_path / ("a_rather_long_directory_name_for_a_ci_runner_" * 2) / "out"
    deep.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    target = deep / "H_with_a_long_name.npz"
    fit = subprocess.run(
        [sys.executable, "-m", "cnnbal", "fit", SAMPLE / "val.parquet", "-o", target],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    assert f"wrote {target}\n" in fit.stdout
    applied = subprocess.run(
        [sys.executable, "-m", "cnnbal", "apply", target, SAMPLE / "test.parquet",
         "-o", deep / "test.corrected.parquet"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    assert len(applied.stderr.strip().splitlines()) == 1
    assert str(deep / "test.corrected.parquet") in applied.stderr


def test_piped_lines_carry_no_trailing_spaces(tmp_path):
    """rich pads table cells and titles to their width; a CI log gets the lines trimmed."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    h = tmp_path / "H.npz"
    commands = [
        ["fit", SAMPLE / "val.parquet", "-o", h],
        ["info", h],
        ["evaluate", SAMPLE / "test.parquet", "-H", h, "--per-class"],
    ]
    for args in commands:
        done = subprocess.run(
            [sys.executable, "-m", "cnnbal", *map(str, args)],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        text = done.stdout + done.stderr
        assert len(text.splitlines()) > 5
        padded = [line for line in text.splitlines() if line != line.rstrip(" ")]
        assert padded == [], args[0]


def test_trimmed_lines_keep_an_unfinished_line_whole():
    import io

    from cnnbal._cli_common import _TrimmedLines

    out = io.StringIO()
    stream = _TrimmedLines(out)
    stream.write("a  b   \nc ")
    assert out.getvalue() == "a  b\n"  # the finished line, trimmed
    stream.write(" d  \n\n  e ")
    assert out.getvalue() == "a  b\nc  d\n\n"  # spaces inside a line stay
    stream.flush()
    assert out.getvalue() == "a  b\nc  d\n\n  e "  # flushed as it is


def test_quiet_prints_nothing_but_errors_and_failed_checks(named):
    tmp, val, test, _ = named
    h = tmp / "H.npz"
    quiet_runs = {
        "fit": ["fit", val, "-o", tmp / "H2.npz", "-q", "--force"],
        "fit (no -o)": ["fit", val, "--quiet", "--force"],
        "apply": ["apply", h, test, "-o", tmp / "out.parquet", "-q"],
        "evaluate": ["evaluate", test, "-H", h, "--per-class", "-q", "--min-gain", "total=-99"],
        "info": ["info", h, "-q"],
        "sweep": ["sweep", val, "-q", "--r-low", "0.1", "--r-high", "0.8", "--beta", "1.5",
                  "--alpha", "3", "--folds", "2"],
    }  # fmt: skip
    for name, args in quiet_runs.items():
        result = run(*args)
        assert result.exit_code == 0, (name, result.output)
        assert result.stdout == "" and result.stderr == "", name
    failed = run("evaluate", test, "-H", h, "-q", "--min-gain", "total=99")
    assert failed.exit_code == 1 and failed.stdout == ""
    assert failed.stderr.startswith("FAILED: total_accuracy")
    error = run("info", tmp / "missing.npz", "-q")
    assert error.exit_code == 2 and error.stderr.startswith("error: ")
    as_json = run("info", h, "-q", "--json")  # --json is what was asked for: still printed
    assert json.loads(as_json.stdout)["n_classes"] == 6


def test_fit_warnings_name_the_classes(tmp_path):
    probs, labels = make_outputs(600, 4, seed=32)
    probs[labels == 2] = np.array([0.7, 0.1, 0.1, 0.1], dtype=np.float32)  # class 2 never right
    names = ["ant", "bee", "cat", "dog"]
    val = write_parquet(tmp_path / "val.parquet", probs, labels, class_names=names)
    result = run("fit", "--force", val, "-o", tmp_path / "H.npz")
    assert result.exit_code == 0, result.output
    assert "zero validation accuracy" in result.stderr and "2 (cat)" in result.stderr
    unnamed = write_parquet(tmp_path / "plain.parquet", probs, labels)
    plain = run("fit", "--force", unnamed, "-o", tmp_path / "H2.npz", "--json")
    assert plain.stderr.rstrip().endswith("for the weights: 2")
    assert json.loads(plain.stdout)["warnings"] == [
        "1 class(es) with zero validation accuracy; accuracy floored at 0.5/n_k for the weights: 2"
    ]


def test_info_reads_as_sections_in_percent(named):
    tmp, *_ = named
    result = run("info", tmp / "H.npz")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for section in ("correction", "validation", "origin"):
        assert section in [line.strip() for line in lines]
    text = result.stdout
    assert re.search(r"per-class accuracy\s+\d+\.\d\d% \.\. \d+\.\d\d%", text)
    assert re.search(r"competitive\s+[\d,]+ \(\d+\.\d%\)", text)
    assert "outputs whose max prob < 0.8" in text
    assert re.search(r"lowest classes\s+\d \((ant|bee|cat|dog|eel|fox)\) \d+\.\d\d%", text)
    assert "{" not in text and "'" not in text  # no Python dict


def test_info_shows_a_sweeps_provenance_readably(named):
    tmp, val, *_ = named
    swept = run(
        "sweep", val, "-o", tmp / "Hs.npz", "-q", "--r-low", "0.05,0.1", "--r-high", "0.8",
        "--beta", "1.5", "--alpha", "3", "--folds", "2", "--max-total-drop", "100",
    )  # fmt: skip
    assert swept.exit_code == 0, swept.output
    text = run("info", tmp / "Hs.npz").stdout
    assert "provenance" in text and "cnnbal sweep" in text
    assert re.search(r"chosen\s+alpha=3, beta=1\.5, r_high=0\.8, r_low=0\.\d+", text)
    assert re.search(r"cv worst20_accuracy\s+\d+\.\d\d% ± \d+\.\d\d \(raw \d+\.\d\d%\)", text)
    assert "grid" in text and " ..." not in text


def test_evaluate_without_h_prints_one_column(named):
    _, _, test, _ = named
    result = run("evaluate", test, "--per-class")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "metric" in line)
    assert "raw" in header and "corrected" not in header and "change" not in header
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert all(line.count("│") == 3 for line in rows[:7])  # metric | raw
    assert not any("val-chosen" in line for line in rows)  # needs H's validation accuracy
    assert "(no H: raw only)" in result.stdout


def test_changed_predictions_show_fixed_broken_and_other(named):
    tmp, _, test, _ = named
    payload = json.loads(run("evaluate", test, "-H", tmp / "H.npz", "--json").stdout)
    changed = payload["changed"]
    table = run("evaluate", test, "-H", tmp / "H.npz").stdout
    row = next(line for line in table.splitlines() if "predictions changed" in line)
    assert f"+{changed['fixed']} fixed" in row
    assert f"-{changed['broken']} broken" in row
    assert f"{changed['other']} other" in row
    assert str(sum(changed.values())) in row


# ---------------------------------------------------------------- 6. one interface


def _help(*args):
    return run(*args, "--help", env={"COLUMNS": "300"}).stdout


def test_shell_completion_is_on():
    text = _help()
    assert "--install-completion" in text and "--show-completion" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_help_uses_upper_case_metavars_and_plain_flags(command):
    text = _help(command)
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert re.findall(r"\{([^}]*)\}", usage) == [
        m.upper() for m in re.findall(r"\{([^}]*)\}", usage)
    ]
    assert not re.search(r"<(bool|path|str|float|int)", text)  # no typer type names
    assert re.search(r"--json\s+Print one JSON", text)  # a flag: no value shown
    assert "-q, --quiet" in text.replace("--quiet  -q", "-q, --quiet") or re.search(
        r"--quiet\s+-q", text
    )
    if command in ("fit", "apply", "sweep"):  # the commands that write a file
        # click's plain layout ("-o, --output FILE") or typer's rich one ("--output -o FILE")
        assert re.search(r"(-o, --output|--output\s+-o)\s+FILE", text)


def test_h_has_a_long_name_and_the_old_spelling_still_works(named):
    tmp, _, test, _ = named
    text = _help("evaluate")
    assert re.search(r"(-H, --correction|--correction\s+-H)\s+FILE", text)
    assert not re.search(r"--h\s", text)
    new = run("evaluate", test, "--correction", tmp / "H.npz", "--json")
    old = run("evaluate", test, "--h", tmp / "H.npz", "--json")
    assert new.exit_code == old.exit_code == 0
    assert json.loads(new.stdout)["metrics"] == json.loads(old.stdout)["metrics"]


def test_fit_without_output_says_nothing_was_written(named, monkeypatch):
    tmp, val, *_ = named
    monkeypatch.chdir(tmp)
    before = sorted(p.name for p in tmp.iterdir())
    result = run("fit", "--force", val)
    assert result.exit_code == 0
    assert "nothing written (no -o/--output)" in result.stderr
    assert sorted(p.name for p in tmp.iterdir()) == before
    payload = json.loads(run("fit", "--force", val, "--json").stdout)
    assert payload["written"] is False and payload["output"] is None


def test_sweep_npy_test_without_test_labels_names_that_flag(tmp_path):
    probs, labels = make_outputs(400, 4, seed=33)
    np.save(tmp_path / "val.npy", probs[:200])
    np.save(tmp_path / "y.npy", labels[:200])
    np.save(tmp_path / "test.npy", probs[200:])
    result = run(
        "sweep", tmp_path / "val.npy", "--labels", tmp_path / "y.npy",
        "--test", tmp_path / "test.npy",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--test-labels" in result.stderr and "pass --labels" not in result.stderr


def test_install_hints_work_from_a_checkout(monkeypatch, tmp_path):
    hint = install_hint("plot")
    assert "pip install 'cnnbal[plot]'" in hint  # the index form, always shown
    assert "pip install -e '" in hint and "[plot]'" in hint  # this repository has pyproject
    monkeypatch.chdir(REPO)
    assert install_hint("plot").startswith("pip install -e '.[plot]'")
    monkeypatch.chdir(tmp_path)
    editable = install_hint("extract").split("'")[1]
    assert Path(editable.removesuffix("[extract]")).resolve() == REPO
