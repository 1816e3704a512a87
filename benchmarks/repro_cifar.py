"""Reproduce the paper's Table 3 rows (CIFAR-10, CIFAR-100) on real CNN outputs.

Each outputs file (10,000 CIFAR test images) is split into stratified halves
(validation / test) over several seeds; H is fitted on the validation half
with the public API and evaluated on the test half (docs/method.md section 6). The
paper's low-20% is printed beside the metrics that are free of its selection
bias (docs/method.md section 5): low-20% chosen on validation, worst-20% recomputed after
correction, balanced accuracy and the worst class.

Run::

    .venv/bin/python benchmarks/repro_cifar.py [--data-dir DIR] [--seeds 10]

The data directory defaults to ``$CNNBAL_DATA`` or ``../shared/data``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from cnnbal.core import apply_correction, fit_elaborated, fit_naive
from cnnbal.metrics import compare

#: The paper's Table 3 (docs/method.md section 6): total, low-20% accuracy, mean low-20% gain.
PAPER_ROWS = {
    10: ("91-95%", "82.5-89.0%", "+0.4"),
    100: ("65-75%", "43.4-56.7%", "+1.8"),
}
FILES = (
    "wideresnet-16-4-cifar-100.npz",
    "wideresnet-16-4-cifar-10.npz",
    "lenet-5-cifar-100.npz",
)
REPORTED = (
    ("total_accuracy", "total"),
    ("low20_accuracy", "low-20% (paper)"),
    ("low20_val_accuracy", "low-20% (val-chosen)"),
    ("worst20_accuracy", "worst-20%"),
    ("balanced_accuracy", "balanced"),
    ("worst_class_accuracy", "worst class"),
)


def default_data_dir() -> Path:
    env = os.environ.get("CNNBAL_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def stratified_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a validation and a test half, each holding half of every class."""
    rng = np.random.default_rng(seed)
    val, test = [], []
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        half = len(members) // 2
        val.append(members[:half])
        test.append(members[half:])
    return np.sort(np.concatenate(val)), np.sort(np.concatenate(test))


def run_file(path: Path, seeds: int) -> dict[str, dict[str, np.ndarray]]:
    """Per method, per metric: array of shape (seeds, 2) holding (raw, corrected)."""
    with np.load(path) as data:
        probs = data["predictions"]
        labels = data["ground_truth"].astype(np.int64)
    results: dict[str, dict[str, list]] = {"elaborated": {}, "naive": {}}
    for seed in range(seeds):
        val, test = stratified_halves(labels, seed)
        for method, fitter in (("elaborated", fit_elaborated), ("naive", fit_naive)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # floored classes (LeNet)
                result = fitter(probs[val], labels[val])
            corrected = apply_correction(result.H, probs[test], result.apply_gate)
            comparison = compare(
                probs[test],
                corrected,
                labels[test],
                val_class_accuracy=result.class_accuracy,
            )
            for name, _ in REPORTED:
                results[method].setdefault(name, []).append(comparison.metrics[name])
    return {m: {k: np.array(v) for k, v in per.items()} for m, per in results.items()}


def _cell(values: np.ndarray) -> str:
    """'raw -> corrected (gain)' in percent, means over seeds (std of the gain)."""
    raw, new = 100 * values[:, 0], 100 * values[:, 1]
    gain = new - raw
    return f"{raw.mean():.2f} -> {new.mean():.2f} ({gain.mean():+.2f} +- {gain.std():.2f})"


def markdown_table(name: str, n_classes: int, results, seeds: int) -> str:
    header = ["method", *[label for _, label in REPORTED]]
    lines = [
        f"### {name} (K={n_classes}, {seeds} seeds, stratified 50/50 val/test)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for method in ("elaborated", "naive"):
        cells = [_cell(results[method][key]) for key, _ in REPORTED]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    total_std = 100 * results["elaborated"]["total_accuracy"].std(axis=0)
    lines.append(
        f"| (std of total over seeds: raw {total_std[0]:.2f}, elaborated {total_std[1]:.2f}) |"
        + " |" * (len(header) - 1)
    )
    if n_classes in PAPER_ROWS and "wideresnet" in name:
        total, low20, gain = PAPER_ROWS[n_classes]
        lines.append(
            f"| paper Table 3, CIFAR-{n_classes} | {total} | {low20}, mean gain {gain} pts |"
            + " - |" * (len(header) - 3)
        )
    lines.append("")
    lines.append("Cells: raw -> corrected mean accuracy in %, (mean gain +- std over seeds) pts.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--files", nargs="*", default=list(FILES))
    args = parser.parse_args(argv)
    for name in args.files:
        path = args.data_dir / name
        if not path.exists():
            print(f"skipping {path}: not found (set --data-dir or CNNBAL_DATA)", file=sys.stderr)
            continue
        results = run_file(path, args.seeds)
        with np.load(path) as data:
            n_classes = data["predictions"].shape[1]
        print(markdown_table(name, n_classes, results, args.seeds))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
