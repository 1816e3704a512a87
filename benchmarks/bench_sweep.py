"""Speed of ``cnnbal.sweep.run_sweep`` against the plain loop it replaces, in the same run.

The default sweep (81 configurations, 5 stratified folds) on a stratified half
of the WRN-16-4 CIFAR-100 outputs, against a loop over the public API that
refits from scratch for every configuration and fold::

    fit_elaborated(train) -> apply_correction(test) -> summarize(test)

(the same four scores: total, worst20, balanced, low20_val on the training
folds' class set). Both must agree to 1e-8; the target is a speed-up of at
least 5x. Times are medians over ``--repeats`` runs, the two interleaved (the
machines are shared and noisy).

BLAS threads: run_sweep uses one BLAS thread for K <= 512 (threadpoolctl), since
small products and solves only lose to thread synchronisation. For a fair
comparison the plain loop runs under the same limit; ``--default-threads`` also
times it once with the default threads (what an unlimited loop gets here).

    .venv/bin/python benchmarks/bench_sweep.py
    .venv/bin/python benchmarks/bench_sweep.py --data ../shared/data/lenet-5-cifar-100.npz

Data: ``--data`` or ``$CNNBAL_DATA`` (a file, or a directory holding
``wideresnet-16-4-cifar-100.npz``); default ``../shared/data`` next to the repo.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

from cnnbal.core import apply_correction, fit_elaborated
from cnnbal.metrics import low_fraction_count, lowest_classes, summarize
from cnnbal.sweep import SCORE_NAMES, grid_configs, run_sweep, stratified_folds

DEFAULT_FILE = "wideresnet-16-4-cifar-100.npz"


def data_path(arg: str | None) -> Path:
    """``--data``, else ``$CNNBAL_DATA``, else ``../shared/data`` beside the repository."""
    raw = arg or os.environ.get("CNNBAL_DATA")
    path = Path(raw) if raw else Path(__file__).resolve().parents[1] / "../shared/data"
    return path / DEFAULT_FILE if path.is_dir() else path


def load_half(path: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified half of the file: the validation set of the benchmark."""
    with np.load(path) as archive:
        probs = archive["predictions"] if "predictions" in archive else archive["probs"]
        labels = archive["ground_truth"] if "ground_truth" in archive else archive["labels"]
    _, val = stratified_folds(labels, 2, seed)[0]
    return probs[val], labels[val].astype(np.int64)


def plain_loop(probs, labels, configs, n_folds, seed) -> np.ndarray:
    """Refit from scratch per configuration and fold with the public functions."""
    scores = np.empty((len(configs), n_folds, len(SCORE_NAMES)))
    n_low = low_fraction_count(probs.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, (train, test) in enumerate(stratified_folds(labels, n_folds, seed)):
            test_probs, test_labels = probs[test], labels[test]
            present = np.bincount(test_labels, minlength=probs.shape[1]) > 0
            for i, config in enumerate(configs):
                result = fit_elaborated(probs[train], labels[train], config)
                corrected = apply_correction(result.H, test_probs, gate=result.apply_gate)
                val_classes = lowest_classes(
                    np.where(present, result.class_accuracy, np.nan), n_low
                )
                metrics = summarize(
                    corrected,
                    test_labels,
                    low20_classes=val_classes,
                    low20_val_classes=val_classes,
                )
                scores[i, k] = [metrics[name] for name in SCORE_NAMES]
    return scores


def one_blas_thread():
    try:
        import scipy.linalg  # noqa: F401  (load every BLAS before limiting)
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def timed(func, *args, **kwargs):
    start = time.perf_counter()
    out = func(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="outputs .npz (default: $CNNBAL_DATA or ../shared/data)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--default-threads",
        action="store_true",
        help="also time the plain loop once with the default BLAS threads",
    )
    args = parser.parse_args()

    path = data_path(args.data)
    probs, labels = load_half(path, args.seed)
    configs = grid_configs()
    print(
        f"{path.name}: validation half n={len(labels)}, K={probs.shape[1]}, "
        f"{len(configs)} configurations x {args.folds} folds = {len(configs) * args.folds} fits"
    )
    run_sweep(probs[:200], labels[:200], configs[:1], n_folds=2)  # warm-up: imports

    fast_times, loop_times = [], []
    for _ in range(args.repeats):
        t_fast, result = timed(
            run_sweep, probs, labels, configs, n_folds=args.folds, seed=args.seed
        )
        with one_blas_thread():
            t_loop, expected = timed(plain_loop, probs, labels, configs, args.folds, args.seed)
        fast_times.append(t_fast)
        loop_times.append(t_loop)
    diff = float(np.abs(result.fold_scores - expected).max())
    fast, loop = statistics.median(fast_times), statistics.median(loop_times)
    n_fits = len(configs) * args.folds
    print(f"run_sweep              {fast:8.3f} s   ({1e3 * fast / n_fits:.2f} ms/fit)")
    print(f"plain loop (1 thread)  {loop:8.3f} s   ({1e3 * loop / n_fits:.2f} ms/fit)")
    print(f"speed-up               {loop / fast:8.1f} x   (target >= 5x)")
    print(f"max |score difference| {diff:.1e}   (must be <= 1e-8)")
    if args.default_threads:
        t_default, _ = timed(plain_loop, probs, labels, configs, args.folds, args.seed)
        print(f"plain loop (default BLAS threads, once) {t_default:.3f} s: {t_default / fast:.1f}x")
    chosen = result.chosen
    print(f"chosen: {chosen.as_dict() if chosen else None} (beats raw: {result.choice.beats_raw})")
    if diff > 1e-8:
        raise SystemExit("run_sweep disagrees with the plain loop")


if __name__ == "__main__":
    main()
