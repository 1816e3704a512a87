"""Issue 8's table: every method of ``fit --method`` on real CNN outputs, chosen on VAL only.

For each file and seed, the outputs are split into stratified validation and
test halves (``stratified_halves`` of ``repro_cifar.py``, so the elaborated
row matches that benchmark and issue 8's table). On the validation half only:

- every method of :data:`cnnbal.methods.METHOD_NAMES` is fitted with
  :func:`cnnbal.methods.fit_method` (hyper-parameters chosen by its own 5-fold
  CV; objective worst20, total-accuracy drop at most 0.5 points);
- unless ``--no-recommend``, every method is also cross-validated as a whole
  (:func:`cnnbal.methods.cross_validate`, nested CV) and
  :func:`cnnbal.methods.recommend` names the method to use (or raw).

Then each fitted correction is measured on the test half (never seen by any
choice). Printed: per method and file, the mean over seeds of the change of
worst-20% / total accuracy in points, the mean fit time (CV included), and the
recommended method's change ("recommended" row: raw counts as 0 / 0). The
acceptance line of issue 8 compares the recommended method's worst-20% gain
with twice the elaborated fit's.

    .venv/bin/python benchmarks/repro_methods.py                  # 3 files, 10 seeds
    .venv/bin/python benchmarks/repro_methods.py --seeds 2 --no-recommend
    .venv/bin/python benchmarks/repro_methods.py --files wideresnet-16-4-cifar-100.npz

Data: ``--data-dir`` or ``$CNNBAL_DATA``; default ``../shared/data`` next to the repo.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
from repro_cifar import stratified_halves

from cnnbal.methods import METHOD_NAMES, cross_validate, fit_method, recommend
from cnnbal.metrics import compare

FILES = (
    "wideresnet-16-4-cifar-100.npz",
    "wideresnet-16-4-cifar-10.npz",
    "lenet-5-cifar-100.npz",
)


def data_dir(arg: str | None) -> Path:
    raw = arg or os.environ.get("CNNBAL_DATA")
    return Path(raw) if raw else Path(__file__).resolve().parents[1] / "../shared/data"


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as archive:
        return archive["predictions"], archive["ground_truth"].astype(np.int64)


def one_seed(probs, labels, seed, methods, with_recommend) -> dict:
    """Test-half changes (points) and fit times of every method for one split."""
    val, test = stratified_halves(labels, seed)
    val_probs, val_labels = probs[val], labels[val]
    test_probs, test_labels = probs[test], labels[test]
    out: dict = {"changes": {}, "seconds": {}, "hyper": {}}
    for method in methods:
        fitted = fit_method(method, val_probs, val_labels, seed=seed)
        corrected = fitted.correction.apply(test_probs)
        metrics = compare(
            test_probs, corrected, test_labels, val_class_accuracy=fitted.class_accuracy
        ).metrics
        out["changes"][method] = {
            name: 100.0 * (after - before) for name, (before, after) in metrics.items()
        }
        out["seconds"][method] = fitted.fit_seconds
        out["hyper"][method] = fitted.hyper
    if with_recommend:
        start = time.perf_counter()
        estimates = [cross_validate(method, val_probs, val_labels, seed=seed) for method in methods]
        out["recommend_seconds"] = time.perf_counter() - start
        out["recommended"] = recommend(estimates)
        out["cv_change"] = {
            e.method: {k: 100.0 * v for k, v in e.mean_change.items()} for e in estimates
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--files", nargs="+", default=list(FILES))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES))
    parser.add_argument("--no-recommend", action="store_true")
    parser.add_argument("--json", help="also write the per-seed results here")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    directory = data_dir(args.data_dir)
    everything: dict = {}
    for name in args.files:
        probs, labels = load(directory / name)
        runs = []
        for seed in range(args.seeds):
            runs.append(one_seed(probs, labels, seed, args.methods, not args.no_recommend))
            print(f"{name} seed {seed}: recommended {runs[-1].get('recommended')}", flush=True)
        everything[name] = runs
        print(
            f"\n## {name}: {probs.shape[0]} outputs, {probs.shape[1]} classes, "
            f"{args.seeds} seeds (change on the test half, points)"
        )
        print("| method | worst-20% | total | balanced | low-20% (val) | fit s | hyper (seed 0) |")
        print("|---|---|---|---|---|---|---|")
        for method in args.methods:
            row = {
                key: np.mean([r["changes"][method][key] for r in runs])
                for key in runs[0]["changes"][method]
            }
            seconds = np.mean([r["seconds"][method] for r in runs])
            print(
                f"| {method} | {row['worst20_accuracy']:+.2f} | {row['total_accuracy']:+.2f} | "
                f"{row['balanced_accuracy']:+.2f} | {row['low20_val_accuracy']:+.2f} | "
                f"{seconds:.3f} | {runs[0]['hyper'][method]} |"
            )
        print(
            "all methods, mean fit time per seed: "
            f"{np.mean([sum(r['seconds'].values()) for r in runs]):.2f} s"
        )
        if not args.no_recommend:
            picks = [r["recommended"] for r in runs]
            gains = [
                r["changes"][p]
                if p is not None
                else {"worst20_accuracy": 0.0, "total_accuracy": 0.0}
                for r, p in zip(runs, picks, strict=True)
            ]
            w20 = np.mean([g["worst20_accuracy"] for g in gains])
            total = np.mean([g["total_accuracy"] for g in gains])
            elaborated = np.mean([r["changes"]["elaborated"]["worst20_accuracy"] for r in runs])
            counts = {p or "raw": picks.count(p) for p in picks}
            print(
                f"recommended (nested CV on VAL): {counts}; test change worst-20% {w20:+.2f}, "
                f"total {total:+.2f}; elaborated worst-20% {elaborated:+.2f}; "
                f"2x elaborated reached: {w20 >= 2 * elaborated and total >= -0.2}; "
                f"recommend time per seed {np.mean([r['recommend_seconds'] for r in runs]):.1f} s"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1, default=str))


if __name__ == "__main__":
    main()
