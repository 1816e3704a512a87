"""cnnbal at dataset scale: every figure a ratio to a baseline measured in the same run.

Parts, each runnable alone (``--part`` may be repeated; no flag: all)::

    .venv/bin/python benchmarks/bench_scale.py --part apply   # --jobs 1 / 2 vs pyarrow read + write
    .venv/bin/python benchmarks/bench_scale.py --part dask    # --engine dask vs --jobs 2
    .venv/bin/python benchmarks/bench_scale.py --part evaluate  # streamed fit/evaluate vs numpy
    .venv/bin/python benchmarks/bench_scale.py --part rss     # peak RSS, 4M vs 16M rows
    .venv/bin/python benchmarks/bench_scale.py --part npy     # one 800 MB .npy: peak RSS
    .venv/bin/python benchmarks/bench_scale.py --part largek  # K = 10,000: fit vs the floor

apply. ``cnnbal apply H.npz shards/ -o out/`` on ``--shards`` parquet shards of
   ``--rows`` x ``--classes`` float32 (columns ``id, label, p_0..p_{K-1}``)
   with ``--jobs 1`` and ``--jobs 2`` (the installed CLI, subprocesses),
   against ONE Python process that reads and writes every shard with pyarrow
   (``pq.read_table`` + ``pq.write_table``, with the column compression cnnbal
   writes: floats uncompressed, the rest snappy; and once more with
   ``pq.write_table``'s defaults, snappy and dictionary). Targets: ``--jobs 1``
   <= 1.3x the baseline, ``--jobs 2`` <= 0.7x ``--jobs 1``.
dask. ``--engine dask`` (a LocalCluster of 2 single-threaded worker processes
   started and closed by the command, as a user without a cluster gets it;
   and once more on a cluster already running, ``--scheduler``) against
   ``--jobs 2``, with the outputs compared byte for byte. Target <= 1.5x.
evaluate. ``evaluate_dataset`` over the shards (reading included) against
   numpy on the concatenation already in memory (``apply_correction`` +
   ``metrics.compare``; reading excluded), both timed inside child processes;
   metrics compared for equality. Target <= 1.3x. The same for the fit
   (two streamed passes vs ``core.fit`` in memory), H compared.
rss. Peak RSS (``getrusage`` of a child process) of ``cnnbal fit``,
   ``evaluate`` and ``apply``, all ``--jobs 1`` (one process: with workers,
   getrusage reports the largest one), on the shards and on ``--rss-factor``
   times as many rows (copies of the same shards).
   Target: within 15%.
npy. ``cnnbal fit`` / ``evaluate`` on one ``.npy`` of 100,000 x 2,000
   float32 (800 MB): peak RSS. Target < 0.8 GB each.
largek. ``core.fit_elaborated`` and ``fit_naive`` at K = ``--large-k`` on
   ``--large-k-rows`` rows against the arithmetic floor measured in the same
   child: one Gram product of the competitive rows (with the column of ones)
   plus one Cholesky of the (K+1)-square system. Targets: fit <= 2x the
   floor, naive <= the elaborated fit.

Times are medians over ``--repeats`` runs, the commands interleaved; the
range of the per-repeat ratios is printed too (the machine is shared: 2
cores, other jobs running). Data is generated under ``--tmp`` (default
``/tmp``), never in the repository, and deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PYTHON = sys.executable
CNNBAL = str(Path(PYTHON).with_name("cnnbal"))
#: Children write bytecode to a private cache (PYTHONDONTWRITEBYTECODE=1 here
#: would recompile cnnbal in every child).
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

#: One Python process reading and writing every shard with plain pyarrow: the floor
#: of `cnnbal apply` on a dataset. argv[3] "cnnbal": the same writer settings as
#: cnnbal's TableWriter (floats uncompressed, no dictionary: the strict floor);
#: "defaults": `pq.write_table`'s defaults (snappy, dictionary), what a user writes.
PLAIN_COPY_ALL = """
import sys, pathlib, pyarrow as pa, pyarrow.parquet as pq
src, dst, codecs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
for path in sorted(src.rglob("*.parquet")):
    table = pq.read_table(path)
    out = dst / path.relative_to(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    if codecs == "defaults":
        pq.write_table(table, out)
        continue
    compression = {f.name: "none" if pa.types.is_floating(f.type) else "snappy"
                   for f in table.schema}
    pq.write_table(table, out, use_dictionary=False, compression=compression,
                   row_group_size=65536)
"""


# ------------------------------------------------------------------ shared helpers


def make_shards(folder: Path, n_shards: int, rows: int, n_classes: int, *, seed: int = 0) -> Path:
    """Write ``n_shards`` parquet shards of synthetic float32 softmax outputs.

    Columns ``id`` (int64), ``label`` (int64), ``p_0..p_{K-1}`` (float32);
    Gaussian logits with the true class boosted by a per-class 2..6, so that
    per-class accuracy varies and a fair share of rows is competitive.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    boost = np.linspace(2.0, 6.0, n_classes)
    for i in range(n_shards):
        labels = rng.integers(0, n_classes, rows)
        logits = rng.standard_normal((rows, n_classes), dtype=np.float32)
        logits[np.arange(rows), labels] += boost[labels].astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        columns = {"id": pa.array(np.arange(i * rows, (i + 1) * rows)), "label": pa.array(labels)}
        for j in range(n_classes):
            columns[f"p_{j}"] = pa.array(logits[:, j])
        pq.write_table(
            pa.table(columns),
            folder / f"part-{i:05d}.parquet",
            use_dictionary=False,
            compression="snappy",
            row_group_size=65536,
        )
    return folder


def run_child(cmd: list[str]) -> float:
    """Run ``cmd`` (output discarded); return its wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CHILD_ENV)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode()}")
    return seconds


def timed_runs(
    commands: dict, repeats: int, fresh: list[Path] | dict[str, Path]
) -> dict[str, list[float]]:
    """Interleave the commands ``repeats`` times.

    ``fresh``: output folders removed before each command (a list: all of them;
    a dict: the named command's own), so no run skips finished shards.
    """
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            folders = [fresh[name]] if isinstance(fresh, dict) else fresh
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
            times[name].append(run_child(cmd))
    return times


def ratio_line(label: str, num: list[float], den: list[float], target: float) -> str:
    """Median ratio, per-repeat range, and the target."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    med = statistics.median(num) / statistics.median(den)
    verdict = "ok" if med <= target else "MISSED"
    return (
        f"| {label} | {med:.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x | <= {target}x | "
        f"{verdict} |"
    )


def fit_h(shards: Path, tmp: Path) -> Path:
    """H from the first shard (the benchmark times apply, not fit)."""
    h_path = tmp / "H.npz"
    first = sorted(shards.rglob("*.parquet"))[0]
    run_child([CNNBAL, "fit", str(first), "-o", str(h_path)])
    return h_path


def same_bytes(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    files_b = sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    return files_a == files_b and all(
        (a / rel).read_bytes() == (b / rel).read_bytes() for rel in files_a
    )


# ------------------------------------------------------------------ apply


def bench_apply(tmp: Path, shards: Path, h_path: Path, repeats: int) -> None:
    n_files = len(list(shards.rglob("*.parquet")))
    print(f"## apply: {n_files} shards, `cnnbal apply` vs one pyarrow read + write process\n")
    out = tmp / "out"
    commands = {
        "plain": [PYTHON, "-c", PLAIN_COPY_ALL, str(shards), str(out), "cnnbal"],
        "plain_defaults": [PYTHON, "-c", PLAIN_COPY_ALL, str(shards), str(out), "defaults"],
        "jobs1": [CNNBAL, "apply", str(h_path), str(shards), "-o", str(out), "--jobs", "1"],
        "jobs2": [CNNBAL, "apply", str(h_path), str(shards), "-o", str(out), "--jobs", "2"],
    }
    times = timed_runs(commands, repeats, [out])
    shutil.rmtree(out, ignore_errors=True)
    print("| command | median s | runs s |\n|---|---|---|")
    for name, values in times.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {statistics.median(values):.2f} | {runs} |")
    print("\n| ratio | median | range over repeats | target | |\n|---|---|---|---|---|")
    print(ratio_line("--jobs 1 / plain read+write", times["jobs1"], times["plain"], 1.3))
    print(
        ratio_line(
            "--jobs 1 / plain, pyarrow's default codecs",
            times["jobs1"],
            times["plain_defaults"],
            1.3,
        )
    )
    print(ratio_line("--jobs 2 / --jobs 1", times["jobs2"], times["jobs1"], 0.7))
    print()


# ------------------------------------------------------------------ dask


def bench_dask(tmp: Path, shards: Path, h_path: Path, repeats: int) -> None:
    from dask.distributed import LocalCluster

    n_files = len(list(shards.rglob("*.parquet")))
    print(f"## dask: {n_files} shards, `--engine dask` (2 worker processes) vs `--jobs 2`\n")
    out_local, out_dask = tmp / "out_local", tmp / "out_dask"
    apply = [CNNBAL, "apply", str(h_path), str(shards), "-o"]
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    try:
        commands = {
            "jobs2": [*apply, str(out_local), "--jobs", "2"],
            "dask_new_cluster": [*apply, str(out_dask), "--engine", "dask", "--jobs", "2"],
            "dask_running_cluster": [
                *apply,
                str(out_dask),
                "--engine",
                "dask",
                "--scheduler",
                cluster.scheduler_address,
            ],
        }
        outputs = {"jobs2": out_local, "dask_new_cluster": out_dask}
        outputs["dask_running_cluster"] = out_dask
        times = timed_runs(commands, repeats, outputs)
        equal = same_bytes(out_local, out_dask)
    finally:
        cluster.close()
    shutil.rmtree(out_local, ignore_errors=True)
    shutil.rmtree(out_dask, ignore_errors=True)
    print("| command | median s | runs s |\n|---|---|---|")
    for name, values in times.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {statistics.median(values):.2f} | {runs} |")
    print("\n| ratio | median | range over repeats | target | |\n|---|---|---|---|---|")
    print(ratio_line("dask, LocalCluster per run / --jobs 2", times["dask_new_cluster"],
                     times["jobs2"], 1.5))  # fmt: skip
    print(ratio_line("dask, running cluster / --jobs 2", times["dask_running_cluster"],
                     times["jobs2"], 1.5))  # fmt: skip
    print(f"\noutputs byte-identical to --jobs 2: {equal}\n")


# ------------------------------------------------------------------ fit / evaluate

#: Child scripts: the work is timed inside the child (imports and interpreter
#: start-up excluded on both sides), the result printed as JSON for comparison.
LOAD_ALL = """
import json, sys, time, warnings
import numpy as np, pyarrow.parquet as pq, pathlib
warnings.simplefilter("ignore")
paths = sorted(pathlib.Path(sys.argv[1]).rglob("*.parquet"))
tables = [pq.read_table(p) for p in paths]
k = sum(1 for n in tables[0].schema.names if n.startswith("p_"))
probs = np.empty((sum(t.num_rows for t in tables), k), dtype=np.float32)
labels = np.concatenate([t.column("label").to_numpy() for t in tables])
row = 0
for t in tables:
    for j in range(k):
        probs[row : row + t.num_rows, j] = t.column(f"p_{j}").to_numpy()
    row += t.num_rows
del tables
"""
EVAL_IN_MEMORY = (
    LOAD_ALL
    + """
from cnnbal.artifact import load_artifact
from cnnbal.core import apply_correction
from cnnbal.metrics import compare
artifact = load_artifact(sys.argv[2])
start = time.perf_counter()
corrected = apply_correction(artifact.H, probs, artifact.apply_gate)
result = compare(probs, corrected, labels, val_class_accuracy=artifact.val_class_accuracy)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "metrics": result.metrics, "changed": result.changed}))
"""
)
EVAL_STREAMED = """
import json, sys, time
from cnnbal.artifact import load_artifact
from cnnbal.pipeline import evaluate_dataset
artifact = load_artifact(sys.argv[2])
start = time.perf_counter()
result = evaluate_dataset(sys.argv[1], artifact)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "metrics": result.metrics, "changed": result.changed}))
"""
FIT_IN_MEMORY = (
    LOAD_ALL
    + """
from cnnbal.core import fit
start = time.perf_counter()
result = fit(probs, labels)
seconds = time.perf_counter() - start
np.save(sys.argv[2], result.H)
print(json.dumps({"seconds": seconds}))
"""
)
FIT_STREAMED = """
import json, sys, time
import numpy as np
from cnnbal.pipeline import fit_dataset
start = time.perf_counter()
artifact, _ = fit_dataset(sys.argv[1])
seconds = time.perf_counter() - start
np.save(sys.argv[2], artifact.H)
print(json.dumps({"seconds": seconds}))
"""


def run_json(script: str, *args: str) -> dict:
    import json

    proc = subprocess.run(
        [PYTHON, "-c", script, *args], capture_output=True, text=True, env=CHILD_ENV
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_fit_evaluate(tmp: Path, shards: Path, h_path: Path, repeats: int) -> None:
    n_files = len(list(shards.rglob("*.parquet")))
    print(
        f"## fit / evaluate: {n_files} shards streamed (reading included) vs numpy on the "
        "concatenation already in memory (reading excluded)\n"
    )
    times: dict[str, list[float]] = {k: [] for k in ("eval_mem", "eval_ds", "fit_mem", "fit_ds")}
    same_metrics, h_diff = True, 0.0
    for _ in range(repeats):
        mem = run_json(EVAL_IN_MEMORY, str(shards), str(h_path))
        ds = run_json(EVAL_STREAMED, str(shards), str(h_path))
        times["eval_mem"].append(mem["seconds"])
        times["eval_ds"].append(ds["seconds"])
        same_metrics &= mem["metrics"] == ds["metrics"] and mem["changed"] == ds["changed"]
        times["fit_mem"].append(
            run_json(FIT_IN_MEMORY, str(shards), str(tmp / "H_mem.npy"))["seconds"]
        )
        times["fit_ds"].append(
            run_json(FIT_STREAMED, str(shards), str(tmp / "H_ds.npy"))["seconds"]
        )
        h_diff = max(
            h_diff, float(np.abs(np.load(tmp / "H_mem.npy") - np.load(tmp / "H_ds.npy")).max())
        )
    print("| step | median s | runs s |\n|---|---|---|")
    for name, values in times.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {statistics.median(values):.2f} | {runs} |")
    print("\n| ratio | median | range over repeats | target | |\n|---|---|---|---|---|")
    print(ratio_line("evaluate_dataset / in-memory numpy evaluate", times["eval_ds"],
                     times["eval_mem"], 1.3))  # fmt: skip
    print(ratio_line("fit_dataset (2 passes) / in-memory fit", times["fit_ds"],
                     times["fit_mem"], float("inf")))  # fmt: skip
    print(f"\nmetrics identical: {same_metrics}; max |H_streamed - H_in_memory| = {h_diff:.1e}\n")


# ------------------------------------------------------------------ peak RSS

#: Runs a command as its child and prints the child's peak RSS (KiB on Linux).
PEAK_RSS = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
if proc.returncode:
    sys.exit(proc.stderr.decode())
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mib(cmd: list[str]) -> float:
    """Peak RSS of ``cmd`` in MiB, measured in a fresh child process (getrusage)."""
    proc = subprocess.run(
        [PYTHON, "-c", PEAK_RSS, *cmd], capture_output=True, text=True, env=CHILD_ENV
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr}")
    return int(proc.stdout.strip()) / 1024


def copies(src: Path, dst: Path, times: int) -> Path:
    """``times`` copies of every shard (datasets refuse the same file twice, links included)."""
    dst.mkdir()
    for copy in range(times):
        for path in sorted(src.glob("*.parquet")):
            shutil.copyfile(path, dst / f"c{copy}-{path.name}")
    return dst


def bench_rss(tmp: Path, shards: Path, h_path: Path, factor: int) -> None:
    import pyarrow.parquet as pq

    small_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in shards.glob("*.parquet"))
    large = copies(shards, tmp / "large", factor)
    print(
        f"## peak RSS (child process, getrusage): {small_rows / 1e6:.2f}M rows vs "
        f"{factor * small_rows / 1e6:.2f}M rows (the same shards copied {factor}x)\n"
    )
    out = tmp / "rss_out"
    print(
        "| command | small MiB | large MiB | large / small | target | |\n|---|---|---|---|---|---|"
    )
    for name, cmd in (
        ("fit --jobs 1", [CNNBAL, "fit", "{data}", "--jobs", "1"]),
        ("evaluate --jobs 1", [CNNBAL, "evaluate", "{data}", "-H", str(h_path), "--jobs", "1"]),
        ("apply --jobs 1", [CNNBAL, "apply", str(h_path), "{data}", "-o", str(out), "--jobs", "1"]),
    ):
        values = []
        for data in (shards, large):
            shutil.rmtree(out, ignore_errors=True)
            values.append(peak_rss_mib([c.replace("{data}", str(data)) for c in cmd]))
        ratio = values[1] / values[0]
        verdict = "ok" if ratio <= 1.15 else "MISSED"
        print(f"| {name} | {values[0]:.0f} | {values[1]:.0f} | {ratio:.2f} | <= 1.15 | {verdict} |")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(large, ignore_errors=True)
    print()


def bench_npy(tmp: Path, rows: int = 100_000, n_classes: int = 2_000) -> None:
    """fit and evaluate of one large .npy: peak RSS against the file's size."""
    path, labels_path = tmp / "big.npy", tmp / "big_labels.npy"
    rng = np.random.default_rng(1)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, n_classes))
    labels = rng.integers(0, n_classes, rows)
    for start in range(0, rows, 5_000):
        block = rng.standard_normal((min(5_000, rows - start), n_classes), dtype=np.float32) * 2
        block[np.arange(len(block)), labels[start : start + len(block)]] += 6
        block -= block.max(axis=1, keepdims=True)
        np.exp(block, out=block)
        block /= block.sum(axis=1, keepdims=True)
        out[start : start + len(block)] = block
    out.flush()
    del out
    np.save(labels_path, labels)
    size = path.stat().st_size / 2**20
    h_big = tmp / "H_big.npz"
    print(f"## .npy {rows:,} x {n_classes:,} float32 ({size:.0f} MiB): peak RSS\n")
    print("| command | peak MiB | / file size | target | seconds |\n|---|---|---|---|---|")
    for name, cmd in (
        ("fit", [CNNBAL, "fit", str(path), "--labels", str(labels_path), "-o", str(h_big)]),
        (
            "evaluate",
            [CNNBAL, "evaluate", str(path), "--labels", str(labels_path), "-H", str(h_big)],
        ),
    ):
        start = time.perf_counter()
        mib = peak_rss_mib(cmd)
        seconds = time.perf_counter() - start
        verdict = "ok" if mib < 0.8 * 1e9 / 2**20 else "MISSED"
        print(
            f"| {name} | {mib:.0f} | {mib / size:.2f} | < 763 MiB (0.8 GB) {verdict} | "
            f"{seconds:.0f} |"
        )
    print()
    path.unlink()


# ------------------------------------------------------------------ large K

LARGE_K = """
import json, sys, time, warnings
import numpy as np
warnings.simplefilter("ignore")
from cnnbal.core import _competitive_rows, fit_elaborated, fit_naive
n_classes, rows = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
labels = rng.integers(0, n_classes, rows)
# true-class boost e^8..e^12 against a softmax denominator of ~1.6 K: true-class
# probabilities of 0.15-0.9, so about two thirds of the rows are competitive
probs = rng.standard_normal((rows, n_classes), dtype=np.float32)
probs[np.arange(rows), labels] += rng.uniform(8, 12, n_classes).astype(np.float32)[labels]
probs -= probs.max(axis=1, keepdims=True)
np.exp(probs, out=probs)
probs /= probs.sum(axis=1, keepdims=True)
start = time.perf_counter()
result = fit_elaborated(probs, labels)
elaborated = time.perf_counter() - start
start = time.perf_counter()
fit_naive(probs, labels)
naive = time.perf_counter() - start
# the arithmetic floor: one Gram product of the competitive rows, one Cholesky
competitive, _ = _competitive_rows(probs, labels, 0.1, 0.8)
x = np.hstack([competitive, np.ones((len(competitive), 1))])
del probs, competitive
start = time.perf_counter()
gram = x.T @ x
gram_s = time.perf_counter() - start
gram[np.diag_indices_from(gram)] += 9.0  # the padding's alpha^2: positive definite
start = time.perf_counter()
np.linalg.cholesky(gram)
cholesky_s = time.perf_counter() - start
print(json.dumps({"elaborated": elaborated, "naive": naive, "gram": gram_s,
                  "cholesky": cholesky_s, "n_competitive": result.n_competitive}))
"""


def bench_largek(n_classes: int, rows: int, repeats: int) -> None:
    print(f"## large K: fit at K = {n_classes:,} on {rows:,} rows vs the arithmetic floor\n")
    runs = [run_json(LARGE_K, str(n_classes), str(rows)) for _ in range(repeats)]
    print("| run | competitive | elaborated s | naive s | gram s | Cholesky s | fit / floor | "
          "naive / elaborated |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for i, r in enumerate(runs):
        floor = r["gram"] + r["cholesky"]
        print(
            f"| {i + 1} | {r['n_competitive']:,} | {r['elaborated']:.1f} | {r['naive']:.1f} | "
            f"{r['gram']:.1f} | {r['cholesky']:.1f} | {r['elaborated'] / floor:.2f}x | "
            f"{r['naive'] / r['elaborated']:.2f}x |"
        )
    fit_ratio = [r["elaborated"] / (r["gram"] + r["cholesky"]) for r in runs]
    naive_ratio = [r["naive"] / r["elaborated"] for r in runs]
    print(
        f"\nfit / floor {statistics.median(fit_ratio):.2f}x (range {min(fit_ratio):.2f}-"
        f"{max(fit_ratio):.2f}, target <= 2x); naive / elaborated "
        f"{statistics.median(naive_ratio):.2f}x (range {min(naive_ratio):.2f}-"
        f"{max(naive_ratio):.2f}, target <= 1x)\n"
    )


# ------------------------------------------------------------------ main

PARTS = ("apply", "dask", "evaluate", "rss", "npy", "largek")
#: Parts that need the parquet shards.
SHARD_PARTS = ("apply", "dask", "evaluate", "rss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", choices=PARTS, help="(repeatable) default: all")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--rows", type=int, default=250_000, help="rows per shard")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default="/tmp", help="where the data goes (deleted afterwards)")
    parser.add_argument(
        "--rss-factor",
        type=int,
        default=4,
        help="rss: the large dataset is this many times the small",
    )
    parser.add_argument("--large-k", type=int, default=10_000, help="largek: classes")
    parser.add_argument("--large-k-rows", type=int, default=3_000, help="largek: rows")
    args = parser.parse_args()
    parts = args.part or list(PARTS)
    tmp = Path(tempfile.mkdtemp(prefix="cnnbal_bench_scale_", dir=args.tmp))
    try:
        if any(part in SHARD_PARTS for part in parts):
            start = time.perf_counter()
            shards = make_shards(tmp / "shards", args.shards, args.rows, args.classes)
            size = sum(p.stat().st_size for p in shards.rglob("*.parquet")) / 2**30
            print(
                f"# bench_scale: {args.shards} shards x {args.rows:,} rows x {args.classes} "
                f"classes float32 ({size:.2f} GiB parquet, made in "
                f"{time.perf_counter() - start:.0f} s), {os.cpu_count()} cores, "
                f"{args.repeats} repeats\n"
            )
            h_path = fit_h(shards, tmp)
        if "apply" in parts:
            bench_apply(tmp, shards, h_path, args.repeats)
        if "dask" in parts:
            bench_dask(tmp, shards, h_path, args.repeats)
        if "evaluate" in parts:
            bench_fit_evaluate(tmp, shards, h_path, args.repeats)
        if "rss" in parts:
            bench_rss(tmp, shards, h_path, args.rss_factor)
        if "npy" in parts:
            bench_npy(tmp)
        if "largek" in parts:
            bench_largek(args.large_k, args.large_k_rows, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # Dask's LocalCluster spawns processes: keep the guard
    main()
