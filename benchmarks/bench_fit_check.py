"""What the fit check (5-fold cross-validation on VAL) adds to ``cnnbal fit``, in the same run.

On a stratified half of the WRN-16-4 CIFAR-100 outputs (5,000 x 100, saved as
an ``.npz`` in a temporary folder), two ratios, each against fit without the
check measured interleaved in the same run:

- **command**: ``python -m cnnbal fit VAL -o H.npz`` as a user runs it, against
  the same command with :func:`cnnbal.check.check_fit` replaced by a stub
  (what fit cost before the check). Interpreter start-up and imports included.
- **in-process**: what the command does after start-up (read the file, fit,
  check, save the artifact) with every import warm, against the same without
  the check. This is the check's cost relative to the fit's own work.

The target (issue 7) is at most +50% on the command. Times are medians over
``--repeats`` runs; the machines are shared and noisy, so run it more than once
and report the range.

    .venv/bin/python benchmarks/bench_fit_check.py
    .venv/bin/python benchmarks/bench_fit_check.py --repeats 15

Data: ``--data`` or ``$CNNBAL_DATA`` (a file, or a directory holding
``wideresnet-16-4-cifar-100.npz``); default ``../shared/data`` next to the repo.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from cnnbal.sweep import stratified_folds

DEFAULT_FILE = "wideresnet-16-4-cifar-100.npz"

# the command without the check: check_fit replaced by a stub that passes
_NO_CHECK = """
import sys
import cnnbal.check as check

def passed(probs, labels, fit_fn, **kwargs):
    return check.FitCheck({}, {}, __import__("numpy").empty((0, 2)), 5, 0, 0.5, True, "off")

check.check_fit = passed
from cnnbal.cli import main
sys.argv = ["cnnbal", *sys.argv[1:]]
main()
"""


def data_path(arg: str | None) -> Path:
    """``--data``, else ``$CNNBAL_DATA``, else ``../shared/data`` beside the repository."""
    raw = arg or os.environ.get("CNNBAL_DATA")
    path = Path(raw) if raw else Path(__file__).resolve().parents[1] / "../shared/data"
    return path / DEFAULT_FILE if path.is_dir() else path


def write_half(source: Path, target: Path, seed: int = 0) -> None:
    """A stratified half of ``source``, saved as ``probs`` / ``labels``."""
    with np.load(source) as archive:
        probs = archive["predictions"] if "predictions" in archive else archive["probs"]
        labels = archive["ground_truth"] if "ground_truth" in archive else archive["labels"]
    _, val = stratified_folds(labels, 2, seed)[0]
    np.savez(target, probs=probs[val], labels=labels[val].astype(np.int64))


def time_command(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - start


def in_process(val: Path, out: Path, with_check: bool) -> float:
    """Read, fit, (check,) save: the command's work after start-up."""
    import dataclasses

    from cnnbal.artifact import save_artifact
    from cnnbal.check import check_fit, fit_function
    from cnnbal.core import DEFAULT_PARAMS
    from cnnbal.io import read_outputs
    from cnnbal.pipeline import fit_outputs

    start = time.perf_counter()
    outputs = read_outputs(val)
    artifact, _ = fit_outputs(outputs)
    if with_check:
        check = check_fit(
            outputs.probs,
            outputs.labels,
            fit_function("elaborated", DEFAULT_PARAMS),
            fitted=artifact,
        )
        artifact = dataclasses.replace(artifact, provenance={"fit_check": check.to_dict()})
    save_artifact(out, artifact)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the outputs file, or a folder holding " + DEFAULT_FILE)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    with tempfile.TemporaryDirectory() as folder:
        val = Path(folder) / "val.npz"
        out = Path(folder) / "H.npz"
        write_half(data_path(args.data), val)
        n, k = np.load(val)["probs"].shape
        print(f"{DEFAULT_FILE}: stratified half, {n:,} x {k}")

        base = [sys.executable, "-m", "cnnbal", "fit", str(val), "-o", str(out)]
        stub = [sys.executable, "-c", _NO_CHECK, "fit", str(val), "-o", str(out)]
        time_command(base)  # warm the file cache and the bytecode
        command = {"with": [], "without": []}
        for _ in range(args.repeats):
            command["without"].append(time_command(stub))
            command["with"].append(time_command(base))

        for flag in (False, True):  # warm imports and caches
            in_process(val, out, flag)
        inner = {"with": [], "without": []}
        for _ in range(args.repeats * 5):
            inner["without"].append(in_process(val, out, False))
            inner["with"].append(in_process(val, out, True))

    for name, times in (("command (python -m cnnbal fit)", command), ("in-process", inner)):
        with_check = statistics.median(times["with"])
        without = statistics.median(times["without"])
        print(
            f"{name}: without the check {1000 * without:.1f} ms, with it "
            f"{1000 * with_check:.1f} ms: +{100 * (with_check / without - 1):.0f}% "
            f"(medians of {len(times['with'])})"
        )


if __name__ == "__main__":
    main()
