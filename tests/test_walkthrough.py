"""Human output in a pipe, read as a new user reads it (the pre-release walkthrough): no
sentence, title or path is cut at a fixed width, notes go to stderr, --help agrees."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from cnnbal.cli import app

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def run(*args):
    # CliRunner's streams are not terminals: what a pipe or a CI log gets
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": None})


def test_sweep_table_title_is_one_line_in_a_pipe():
    result = run("sweep", SAMPLE / "val.parquet", "--r-low", "0.1", "--r-high", "0.8",
                 "--beta", "1.5,2", "--alpha", "3", "--folds", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith("2-fold CV on validation (n=449, K=10): best 2 of 2 by worst20")
    assert first.rstrip().endswith("accuracy %, mean±std over folds")


def test_compare_sentences_and_paths_are_not_cut_at_the_table_width(tmp_path):
    target = tmp_path / ("a_long_directory_name_" * 4) / "recommended_correction.npz"
    target.parent.mkdir()
    result = run("compare", SAMPLE / "val.parquet", "--methods", "logit-adjust,class-dro",
                 "-o", target)  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"wrote {target}: class-dro, refit on all of VAL" in lines
    decision = [line for line in lines if line.startswith("Recommended (VAL only")]
    assert len(decision) == 1 and decision[0].endswith("total +1.12 pts.")
    # the table itself still fits 100 columns
    table = lines[: lines.index(next(ln for ln in lines if ln.startswith("cv: mean change")))]
    assert max(len(line) for line in table) <= 100


def test_compare_notes_go_to_stderr(tmp_path):
    """A fit warning (a class without validation samples) is a note on stderr, never mixed
    into the table on stdout, with or without --json."""
    with np.load(SAMPLE / "val.npz", allow_pickle=False) as val:
        probs, labels = val["probs"], val["labels"]
    keep = labels != 9
    np.savez(tmp_path / "val.npz", probs=probs[keep], labels=labels[keep])
    result = run("compare", tmp_path / "val.npz", "--methods", "logit-adjust")
    assert result.exit_code == 0, result.output
    assert "note (logit-adjust):" in result.stderr
    assert "note (" not in result.stdout


def test_cv_flags_read_the_same_in_every_command():
    """--folds, --objective and --prior show one metavar wherever they appear."""
    metavars: dict[str, set[str]] = {}
    for command in ("fit", "sweep", "compare"):
        text = run(command, "--help").stdout.split("Options:")[1]
        for flag in ("--folds", "--objective", "--prior"):
            found = re.search(rf"^  {flag} (\S+)", text, re.M)
            if found:
                metavars.setdefault(flag, set()).add(found.group(1))
    assert metavars == {
        "--folds": {"N"},
        "--objective": {"worst20|low20_val|balanced|total"},
        "--prior": {"uniform|val|FILE"},
    }


def test_a_refused_fit_with_o_does_not_say_that_o_was_missing(tmp_path):
    """`fit -o H.npz` refused by the fit check: the FAILED line says why; no 'no -o' note."""
    from tests.test_check import three_weak_classes

    probs, labels = three_weak_classes()
    np.savez(tmp_path / "val.npz", probs=probs, labels=labels)
    refused = run("fit", tmp_path / "val.npz", "-o", tmp_path / "H.npz")
    assert refused.exit_code == 1
    assert "FAILED: fit check" in refused.stderr
    assert "no -o/--output" not in refused.stderr
    dry = run("fit", tmp_path / "val.npz", "--force")
    assert "note: nothing written (no -o/--output)" in dry.stderr


def test_docs_checks_run_outside_a_git_checkout(tmp_path, monkeypatch):
    """The README's test command also passes in an unpacked source archive (no .git):
    tests/test_docs.py lists the shipped folders itself instead of failing on git."""
    import subprocess

    from tests import test_docs

    real_run = subprocess.run

    def no_git(args, **kwargs):
        if args[:2] == ["git", "ls-files"]:
            return subprocess.CompletedProcess(args, 128, "", "not a git repository")
        return real_run(args, **kwargs)

    monkeypatch.setattr(test_docs.subprocess, "run", no_git)
    files = {str(path.relative_to(test_docs.REPO)) for path in test_docs.tracked_text_files()}
    assert {"README.md", "CHANGELOG.md", "cnnbal/cli.py", "docs/method.md"} <= files
    assert not any(name.startswith(".venv") for name in files)
    test_docs.test_every_cited_section_exists()


def test_readme_sample_table_is_what_evaluate_prints(tmp_path):
    """The table under "Set up" is the output of the set-up command, line for line."""
    readme = (SAMPLE.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("```\ntest.parquet: 450 samples", 1)[1].split("```", 1)[0]
    shown = ("test.parquet: 450 samples" + block).splitlines()
    assert run("fit", SAMPLE / "val.parquet", "-o", tmp_path / "H.npz", "-q").exit_code == 0
    result = run("evaluate", SAMPLE / "test.parquet", "-H", tmp_path / "H.npz")
    assert result.exit_code == 0, result.output
    assert [line.rstrip() for line in result.stdout.splitlines()] == shown


def test_top_level_and_extract_help_name_what_the_tool_does_now():
    top = " ".join(run("--help").stdout.split())
    assert "logit biases" in top and "cnnbal compare" in top
    extract = " ".join(run("extract", "--help").stdout.split())
    assert "device, amp, precision, seconds, images_per_second, skipped" in extract


def test_evaluate_help_says_what_a_point_is_for_every_metric():
    """README: points are hundredths of the metric, so a macro_f1 or squared_error gate
    reads the same way; --help must not say 'percentage points' only."""
    text = " ".join(run("evaluate", "--help").stdout.split())
    assert "hundredths of the metric" in text
    assert "for squared_error a gain is a decrease" in text


def test_sweep_o_with_nothing_eligible_says_so_even_when_quiet(tmp_path):
    """Exit 1 is a failed check: `sweep -o H.npz -q` (or --json) must still name it on
    stderr, as `fit` does, instead of exiting 1 in silence."""
    from tests.test_check import three_weak_classes

    probs, labels = three_weak_classes()
    np.savez(tmp_path / "weak.npz", probs=probs, labels=labels)
    grid = ["--r-low", "0.1", "--r-high", "0.8", "--beta", "1.5", "--alpha", "3"]
    for extra in (["-q"], ["--json"], ["-q", "--json"]):
        result = run("sweep", tmp_path / "weak.npz", *grid, "-o", tmp_path / "H.npz", *extra)
        assert result.exit_code == 1, extra
        failed = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
        assert len(failed) == 1, (extra, result.stderr)
        assert "Nothing written to" in failed[0] and "--max-total-drop" in failed[0]
        assert not (tmp_path / "H.npz").exists()


def test_readme_class_dro_fit_output_is_what_fit_prints(tmp_path):
    """The `fit --method class-dro` block of the README, line for line (but the time)."""
    readme = (SAMPLE.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("```\nfit val.parquet: class-dro", 1)[1].split("```", 1)[0]
    shown = ("fit val.parquet: class-dro" + block).splitlines()
    result = run("fit", SAMPLE / "val.parquet", "--method", "class-dro", "-o", tmp_path / "C.npz")
    assert result.exit_code == 0, result.output
    printed = result.stdout.splitlines()
    printed[-1] = printed[-1].replace(str(tmp_path / "C.npz"), "C.npz")

    def no_time(line):
        return re.sub(r"; \d+ ms$", "; _ ms", line)

    assert [no_time(line) for line in printed] == [no_time(line) for line in shown]
