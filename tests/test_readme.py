"""The README's promises: its Python examples run, its set-up commands are the ones CI runs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_python_examples_run_on_the_sample_data(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    with np.load(REPO / "sample_data" / "val.npz", allow_pickle=False) as val:
        val_probs, val_labels = val["probs"], val["labels"]
    with np.load(REPO / "sample_data" / "test.npz", allow_pickle=False) as test:
        test_probs, test_labels = test["probs"], test["labels"]
    monkeypatch.chdir(tmp_path)
    from cnnbal.pipeline import fit_file

    fit_file(REPO / "sample_data" / "val.npz", "H.npz")
    namespace = {
        "val_probs": val_probs,
        "val_labels": val_labels,
        "test_probs": test_probs,
        "test_labels": test_labels,
        "probs": test_probs,
    }
    results = []
    for block in blocks:
        scope = dict(namespace)
        exec(compile(block, "README.md", "exec"), scope)
        results.append(scope)
    # the plain-numpy artifact example reproduces the library's correction (before clipping)
    from cnnbal.core import apply_correction

    plain = next(scope for scope in results if "gate" in scope)
    expected = apply_correction(plain["H"], test_probs, plain["gate"], clip=False)
    np.testing.assert_allclose(plain["corrected"], expected, atol=1e-6)
    api = next(scope for scope in results if "cmp" in scope)
    raw, new = api["cmp"].metrics["worst20_accuracy"]
    assert new > raw  # the sample data shows the effect through the API too


def test_exactly_two_setup_commands_and_ci_runs_the_second():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2
    assert "cnnbal fit sample_data/val.parquet" in commands[0]
    assert "pytest" in commands[1]
    marker = README.split("<!-- ci: test command -->", 1)[1]
    assert re.search(r"```bash\n(.*?)\n```", marker, flags=re.S).group(1) == commands[1]
    assert shutil.which("bash") is not None
    assert "ci: test command" in (REPO / ".ci" / "run").read_text()
