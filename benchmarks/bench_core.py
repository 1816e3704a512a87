"""Speed of cnnbal against the arithmetic it cannot avoid, measured in the same run.

Three parts, each runnable alone (no flag: all three)::

    .venv/bin/python benchmarks/bench_core.py --cli     # a. `cnnbal fit` / `evaluate` wall time
    .venv/bin/python benchmarks/bench_core.py --large   # b. fit at N=50,000, K=1,000
    .venv/bin/python benchmarks/bench_core.py --apply   # c. `cnnbal apply` on 1e6 x 100 parquet

a. The installed CLI (a subprocess) against a minimal numpy script (also a
   subprocess) on the CIFAR-100 validation/test halves: np.load, the elaborated
   least squares on the stacked rows (normal equations), an argmax accuracy.
   Target <= 2x. H is checked against lstsq on the stacked rows (<= 1e-8).
b. ``cnnbal.core.fit_elaborated`` on synthetic softmax outputs against one Gram
   product ``X.T @ X`` of the same stacked rows (the floor of an exact fit), and
   ``numpy.linalg.lstsq`` on those rows for reference. Target <= 2x.
c. ``cnnbal apply`` on a float32 parquet file (columns p_0..p_99, label, id)
   against a plain ``pq.read_table`` + ``pq.write_table`` of the same file
   (subprocesses both), and the peak RSS of ``cnnbal apply`` at several row
   counts (it should stay flat). Target <= 1.3x.

Times are medians over ``--repeats`` runs, baseline and cnnbal interleaved (the
machines are shared and noisy). Data: ``--data-dir`` or ``$CNNBAL_DATA``
(default ``../shared/data``).
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

PYTHON = sys.executable
CNNBAL = str(Path(PYTHON).with_name("cnnbal"))
#: Children write bytecode to a private cache (an installed package has its .pyc
#: files; PYTHONDONTWRITEBYTECODE=1 here would recompile cnnbal on every run).
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

#: The elaborated fit in plain numpy (docs/method.md section 3): stacked rows, normal equations
#: (np.linalg.lstsq on the same rows gives the same H but is 5-50x slower on these
#: 2 shared cores, which would flatter cnnbal; the exactness check uses it).
MIN_FIT = """
import sys, numpy as np
d = np.load(sys.argv[1]); p = d["probs"].astype(np.float64); y = d["labels"]
n, k = p.shape
p /= p.sum(1, keepdims=True)
pred = p.argmax(1); counts = np.bincount(y, minlength=k)
acc = np.maximum(np.bincount(y[pred == y], minlength=k) / counts, 0.5 / counts)
m = (p[np.arange(n), y] > 0.1) & (p.max(1) < 0.8)
s = acc[y[m]] ** -1.5
X = np.vstack([np.hstack([p[m], np.ones((m.sum(), 1))]) * s[:, None],
               np.hstack([3 * np.eye(k), np.ones((k, 1))])])
T = np.vstack([np.eye(k)[y[m]] * s[:, None], 3 * np.eye(k)])
H = np.linalg.solve(X.T @ X, X.T @ T).T
np.save(sys.argv[2], H)
print("val accuracy", np.mean(pred == y))
"""

#: Evaluate in plain numpy (docs/method.md section 4): gate, affine map, argmax accuracy.
MIN_EVAL = """
import sys, numpy as np
d = np.load(sys.argv[1]); p = d["probs"]; y = d["labels"]; H = np.load(sys.argv[2])
q = p @ H[:, :-1].T + H[:, -1]
gated = p.max(1) >= 0.8
q[gated] = p[gated]
print("raw", np.mean(p.argmax(1) == y), "corrected", np.mean(q.argmax(1) == y))
"""

#: Plain pyarrow read + write of a whole parquet file (the floor of `apply`).
PLAIN_COPY = """
import sys, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
pq.write_table(t, sys.argv[2], use_dictionary=False, compression="snappy",
               row_group_size=65536)
"""


def default_data_dir() -> Path:
    env = os.environ.get("CNNBAL_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


#: Runs argv[1:] and prints its peak RSS in KiB. A fork of this (large) benchmark
#: process would report the parent's high-water mark as the child's ru_maxrss.
RSS_WRAPPER = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def run_child(cmd: list[str], env: dict | None = None) -> float:
    """Run ``cmd``; return its wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env or CHILD_ENV
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode()}")
    return seconds


def peak_rss_mib(cmd: list[str]) -> float:
    """Peak resident memory of ``cmd`` in MiB, measured from a small wrapper process."""
    out = subprocess.run(
        [PYTHON, "-c", RSS_WRAPPER, *cmd], capture_output=True, check=True, env=CHILD_ENV
    )
    return int(out.stdout.split()[-1]) / 1024


def interleaved(commands: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each command, run in turn ``repeats`` times (after one warm-up each)."""
    for cmd in commands.values():
        run_child(cmd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            times[name].append(run_child(cmd))
    return times


def timed(func, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        out.append(time.perf_counter() - start)
    return out


def _row(name: str, times: list[float], base: float | None) -> str:
    med = statistics.median(times)
    ratio = f"{med / base:.2f}x" if base else "1.00x (baseline)"
    return f"| {name} | {1000 * med:,.0f} | {1000 * min(times):,.0f} | {ratio} |"


def _table(rows: list[str]) -> str:
    head = "| what | median ms | min ms | vs baseline |\n|---|---|---|---|"
    return "\n".join([head, *rows])


# ------------------------------------------------------------------ a. CLI


def bench_cli(tmp: Path, data_dir: Path, repeats: int) -> None:
    with np.load(data_dir / "wideresnet-16-4-cifar-100.npz") as data:
        probs, labels = data["predictions"], data["ground_truth"].astype(np.int64)
    rng = np.random.default_rng(0)
    val, test = [], []
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        val.append(members[: len(members) // 2])
        test.append(members[len(members) // 2 :])
    val, test = np.sort(np.concatenate(val)), np.sort(np.concatenate(test))
    np.savez(tmp / "val.npz", probs=probs[val], labels=labels[val])
    np.savez(tmp / "test.npz", probs=probs[test], labels=labels[test])
    h_cnnbal, h_min = tmp / "H.npz", tmp / "H_min.npy"

    fit_times = interleaved(
        {
            "minimal numpy fit (python -c)": [
                PYTHON,
                "-c",
                MIN_FIT,
                str(tmp / "val.npz"),
                str(h_min),
            ],
            "cnnbal fit val.npz -o H.npz": [
                CNNBAL,
                "fit",
                str(tmp / "val.npz"),
                "-o",
                str(h_cnnbal),
            ],
        },
        repeats,
    )
    eval_times = interleaved(
        {
            "minimal numpy evaluate (python -c)": [
                PYTHON,
                "-c",
                MIN_EVAL,
                str(tmp / "test.npz"),
                str(h_min),
            ],
            "cnnbal evaluate test.npz -H H.npz": [
                CNNBAL,
                "evaluate",
                str(tmp / "test.npz"),
                "-H",
                str(h_cnnbal),
            ],
            "cnnbal evaluate ... --json": [
                CNNBAL,
                "evaluate",
                str(tmp / "test.npz"),
                "-H",
                str(h_cnnbal),
                "--json",
            ],
        },
        repeats,
    )
    startup = interleaved(
        {
            "python -c 'import numpy'": [PYTHON, "-c", "import numpy"],
            "cnnbal --help": [CNNBAL, "--help"],
        },
        repeats,
    )
    print(f"## a. CLI wall time, CIFAR-100 halves (5,000 x 100), {repeats} repeats\n")
    rows = []
    for group in (fit_times, eval_times, startup):
        names = list(group)
        base = statistics.median(group[names[0]])
        rows.append(_row(names[0], group[names[0]], None))
        rows.extend(_row(name, group[name], base) for name in names[1:])
    print(_table(rows))

    from cnnbal.artifact import load_artifact
    from cnnbal.core import DEFAULT_PARAMS, fit_elaborated

    result = fit_elaborated(probs[val], labels[val])
    x, t = stacked_rows(probs[val], labels[val], result, DEFAULT_PARAMS)
    h_lstsq = np.linalg.lstsq(x, t, rcond=None)[0].T
    diff = np.abs(load_artifact(h_cnnbal).H - h_lstsq).max()
    diff_min = np.abs(np.load(h_min) - h_lstsq).max()
    print(
        f"\nmax |H_cnnbal - H_lstsq| = {diff:.2e} (must be < 1e-8); "
        f"minimal script: {diff_min:.2e}\n"
    )


# ------------------------------------------------------------------ b. large fit


def synthetic_outputs(
    n_samples: int, n_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of Gaussian logits with the true class boosted, float32.

    Scale and boost are chosen so that about half the rows are competitive
    under the paper's defaults (true-class probability above 0.1, maximum
    below 0.8) and per-class accuracy varies across classes.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_samples)
    logits = rng.standard_normal((n_samples, n_classes), dtype=np.float32)
    class_boost = rng.uniform(4.5, 7.5, n_classes).astype(np.float32)
    logits[np.arange(n_samples), labels] += class_boost[labels]
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits, labels


def stacked_rows(probs, labels, result, params) -> tuple[np.ndarray, np.ndarray]:
    """Rows X and targets T of docs/method.md section 3, step 4 (weighted samples, padding)."""
    p = probs.astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    k = p.shape[1]
    mask = (p[np.arange(len(labels)), labels] > params.r_low) & (p.max(axis=1) < params.r_high)
    n = int(mask.sum())
    acc = np.maximum(result.class_accuracy, 0.5 / result.class_counts)
    s = acc[labels[mask]] ** -params.beta
    x = np.empty((n + k, k + 1))
    x[:n, :k] = p[mask] * s[:, None]
    x[:n, k] = s
    x[n:, :k] = params.alpha * np.eye(k)
    x[n:, k] = 1.0
    t = np.zeros((n + k, k))
    t[np.arange(n), labels[mask]] = s
    t[n:] = params.alpha * np.eye(k)
    return x, t


def bench_large(n_samples: int, n_classes: int, repeats: int, with_lstsq: bool) -> None:
    from cnnbal.core import DEFAULT_PARAMS, FitParams, fit_elaborated

    probs, labels = synthetic_outputs(n_samples, n_classes)
    print(f"## b. fit at N={n_samples:,}, K={n_classes:,} (float32 input), {repeats} repeats\n")
    rows = []
    for label, params in (
        ("paper defaults", DEFAULT_PARAMS),
        ("all rows competitive (r_low=0, r_high=1)", FitParams(r_low=0.0, r_high=1.0)),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = fit_elaborated(probs, labels, params)
        x, t = stacked_rows(probs, labels, result, params)
        share = result.n_competitive / n_samples
        gram_times = timed(lambda x=x: x.T @ x, repeats)
        fit_times = []
        for _ in range(repeats):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                start = time.perf_counter()
                result = fit_elaborated(probs, labels, params)
                fit_times.append(time.perf_counter() - start)
        base = statistics.median(gram_times)
        rows.append(_row(f"X.T @ X, {label}: {share:.0%} competitive", gram_times, None))
        rows.append(_row(f"fit_elaborated, {label}", fit_times, base))
        if with_lstsq and params is DEFAULT_PARAMS:
            lstsq_times = timed(lambda x=x, t=t: np.linalg.lstsq(x, t, rcond=None), 1)
            rows.append(_row("numpy.linalg.lstsq on X (1 run)", lstsq_times, base))
            h_lstsq = np.linalg.lstsq(x, t, rcond=None)[0].T
            diff = np.abs(result.H - h_lstsq).max()
            print(f"max |H_fit - H_lstsq| = {diff:.2e} (paper defaults)")
    print(_table(rows))
    print()


# ------------------------------------------------------------------ c. apply


def write_parquet(path: Path, n_rows: int, n_classes: int, layout: str) -> None:
    """Synthetic float32 softmax outputs as parquet, written in 64k-row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    block = 65_536
    for start in range(0, n_rows, block):
        rows = min(block, n_rows - start)
        probs, labels = synthetic_outputs(rows, n_classes, seed=start)
        columns = {"id": pa.array(np.arange(start, start + rows, dtype=np.int64))}
        columns["label"] = pa.array(labels)
        if layout == "columns":
            for j in range(n_classes):
                columns[f"p_{j}"] = pa.array(probs[:, j])
        else:
            values = pa.array(probs.reshape(-1))
            columns["probs"] = pa.FixedSizeListArray.from_arrays(values, n_classes)
        batch = pa.RecordBatch.from_pydict(columns)
        if writer is None:
            writer = pq.ParquetWriter(
                str(path), batch.schema, use_dictionary=False, compression="snappy"
            )
        writer.write_batch(batch, row_group_size=block)
    writer.close()


def fit_h(tmp: Path, n_classes: int) -> Path:
    probs, labels = synthetic_outputs(20_000, n_classes, seed=1)
    np.savez(tmp / "fit.npz", probs=probs, labels=labels)
    h_path = tmp / "H_apply.npz"
    run_child([CNNBAL, "fit", str(tmp / "fit.npz"), "-o", str(h_path)])
    return h_path


def bench_apply(tmp: Path, n_rows: int, rss_rows: list[int], repeats: int) -> None:
    n_classes = 100
    h_path = fit_h(tmp, n_classes)
    print(f"## c. apply, {n_rows:,} x {n_classes} float32 parquet, {repeats} repeats\n")
    rows = []
    for layout in ("columns", "list"):
        src = tmp / f"in_{layout}.parquet"
        write_parquet(src, n_rows, n_classes, layout)
        size = src.stat().st_size / 2**20
        times = interleaved(
            {
                f"plain pq.read_table + write_table ({layout}, {size:.0f} MiB)": [
                    PYTHON,
                    "-c",
                    PLAIN_COPY,
                    str(src),
                    str(tmp / "copy.parquet"),
                ],
                f"cnnbal apply ({layout})": [
                    CNNBAL,
                    "apply",
                    str(h_path),
                    str(src),
                    "-o",
                    str(tmp / "out.parquet"),
                ],
            },
            repeats,
        )
        names = list(times)
        base = statistics.median(times[names[0]])
        rows.append(_row(names[0], times[names[0]], None))
        rows.append(_row(names[1], times[names[1]], base))
        src.unlink()
    print(_table(rows))

    print("\nPeak RSS (MiB) of the child process, columns layout:\n")
    print("| rows | cnnbal apply | plain read + write |\n|---|---|---|")
    for n in rss_rows:
        src = tmp / f"rss_{n}.parquet"
        write_parquet(src, n, n_classes, "columns")
        rss_apply = peak_rss_mib([CNNBAL, "apply", str(h_path), str(src), "-o", str(tmp / "o.pq")])
        rss_plain = peak_rss_mib([PYTHON, "-c", PLAIN_COPY, str(src), str(tmp / "c.parquet")])
        print(f"| {n:,} | {rss_apply:,.0f} | {rss_plain:,.0f} |")
        src.unlink()
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cli", action="store_true", help="a. CLI fit/evaluate wall time")
    parser.add_argument("--large", action="store_true", help="b. fit at N=50,000, K=1,000")
    parser.add_argument("--apply", action="store_true", help="c. apply on a parquet file")
    parser.add_argument("--repeats", type=int, default=None, help="default: a 9, b 5, c 5")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--n-samples", type=int, default=50_000)
    parser.add_argument("--n-classes", type=int, default=1_000)
    parser.add_argument("--no-lstsq", action="store_true", help="b: skip the slow lstsq")
    parser.add_argument("--rows", type=int, default=1_000_000, help="c: rows of the file")
    parser.add_argument(
        "--rss-rows", type=lambda s: [int(x) for x in s.split(",")], default=[250_000, 500_000]
    )
    args = parser.parse_args(argv)
    run_all = not (args.cli or args.large or args.apply)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} cores\n")
    with tempfile.TemporaryDirectory(prefix="cnnbal-bench-") as tmp:
        tmp = Path(tmp)
        CHILD_ENV["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
        if args.cli or run_all:
            bench_cli(tmp, args.data_dir, args.repeats or 9)
        if args.large or run_all:
            bench_large(args.n_samples, args.n_classes, args.repeats or 5, not args.no_lstsq)
        if args.apply or run_all:
            rss_rows = sorted(set(args.rss_rows) | {args.rows})
            bench_apply(tmp, args.rows, rss_rows, args.repeats or 5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
