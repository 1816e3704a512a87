"""Start-up discipline: each command imports only what it uses.

Every case runs the CLI in a fresh interpreter and lists which heavy modules it
left in ``sys.modules``. The timings are in ``benchmarks/bench_startup.py``;
here only the imports are pinned (no timing assertions).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cnnbal.artifact import Artifact, save_artifact
from cnnbal.core import fit_elaborated
from tests.conftest import make_outputs

#: Never needed to print help or describe an artifact.
HEAVY = (
    "numpy",
    "pyarrow",
    "scipy",
    "torch",
    "matplotlib",
    "pydantic",
    "rich",
    "threadpoolctl",
    "cnnbal.core",
    "cnnbal.io",
    "cnnbal.pipeline",
    "cnnbal.sweep",
    "cnnbal.extract",
)

PROBE = """
import json, sys
from cnnbal.cli import app
sys.argv = ["cnnbal", *json.loads(sys.argv[1])]
try:
    app()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def loaded_after(*args: str) -> tuple[int, set[str]]:
    """Run ``cnnbal ARGS`` in a fresh interpreter; its exit code and the HEAVY modules loaded."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    modules = set(report["modules"])
    return report["code"], {name for name in HEAVY if name in modules}


@pytest.fixture(scope="module")
def artifact_path(tmp_path_factory):
    probs, labels = make_outputs(n_samples=300, n_classes=4)
    path = tmp_path_factory.mktemp("startup") / "H.npz"
    save_artifact(path, Artifact.from_fit(fit_elaborated(probs, labels)))
    return path


@pytest.mark.parametrize("args", [(), ("--help",), ("fit", "--help"), ("--version",)])
def test_help_imports_no_numeric_or_rendering_library(args):
    # typer >= 0.29 loads pydantic to coerce any parameter it processes: for a
    # subcommand's --help, the root's own --help flag. That is typer's floor.
    code, heavy = loaded_after(*args)
    assert code in (0, 2)  # no arguments at all: help on stdout and exit 2 (no_args_is_help)
    allowed = {"pydantic"} if args[:1] == ("fit",) else set()
    assert heavy <= allowed


def test_info_json_reads_the_artifact_with_numpy_only(artifact_path):
    code, heavy = loaded_after("info", str(artifact_path), "--json")
    assert code == 0
    assert heavy == {"numpy", "pydantic"}  # numpy reads the .npz; typer brings pydantic


def test_info_table_adds_only_rich(artifact_path):
    code, heavy = loaded_after("info", str(artifact_path))
    assert code == 0
    assert heavy == {"numpy", "pydantic", "rich"}


def test_rich_help_rendering_is_not_loaded_for_a_usage_error():
    # typer's rich help (rich.markdown, markdown_it, pygments) costs about as
    # much as numpy; cnnbal prints plain help and plain usage errors instead.
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(["fit", "--beta", "x", "v.npz"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["code"] == 2
    assert "Invalid value for '--beta'" in proc.stderr
    assert not {"rich.markdown", "markdown_it", "pygments"} & set(report["modules"])


def test_core_names_still_import_from_the_package():
    import cnnbal

    assert cnnbal.FitParams().alpha == 3.0
    assert callable(cnnbal.fit_elaborated)
    assert {"fit_naive", "apply_correction"} <= set(dir(cnnbal))
    with pytest.raises(AttributeError):
        cnnbal.no_such_name  # noqa: B018
    assert np.isfinite(cnnbal.DEFAULT_PARAMS.r_high)
