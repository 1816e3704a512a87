"""cnnbal at dataset scale: every figure a ratio to a baseline measured in the same run.

Parts, each runnable alone (``--part`` may be repeated; no flag: all)::

    .venv/bin/python benchmarks/bench_scale.py --part apply   # --jobs 1 / 2 vs pyarrow read + write
    .venv/bin/python benchmarks/bench_scale.py --part dask    # --engine dask vs --jobs 2

apply. ``cnnbal apply H.npz shards/ -o out/`` on ``--shards`` parquet shards of
   ``--rows`` x ``--classes`` float32 (columns ``id, label, p_0..p_{K-1}``)
   with ``--jobs 1`` and ``--jobs 2`` (the installed CLI, subprocesses),
   against ONE Python process that reads and writes every shard with pyarrow
   (``pq.read_table`` + ``pq.write_table``, the same column compression
   cnnbal writes: floats uncompressed, the rest snappy). Targets: ``--jobs 1``
   <= 1.3x the baseline, ``--jobs 2`` <= 0.7x ``--jobs 1``.
dask. ``--engine dask`` (a LocalCluster of 2 single-threaded worker processes
   started and closed by the command, as a user without a cluster gets it;
   and once more on a cluster already running, ``--scheduler``) against
   ``--jobs 2``, with the outputs compared byte for byte. Target <= 1.5x.

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
#: of `cnnbal apply` on a dataset (same writer settings as cnnbal's TableWriter).
PLAIN_COPY_ALL = """
import sys, pathlib, pyarrow as pa, pyarrow.parquet as pq
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for path in sorted(src.rglob("*.parquet")):
    table = pq.read_table(path)
    out = dst / path.relative_to(src)
    out.parent.mkdir(parents=True, exist_ok=True)
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


def timed_runs(commands: dict, repeats: int, fresh: list[Path]) -> dict[str, list[float]]:
    """Interleave the commands ``repeats`` times; ``fresh`` folders are removed before each."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            for folder in fresh:
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
        "plain": [PYTHON, "-c", PLAIN_COPY_ALL, str(shards), str(out)],
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
        times = timed_runs(commands, repeats, [out_dask])
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


# ------------------------------------------------------------------ main

PARTS = ("apply", "dask")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", choices=PARTS, help="(repeatable) default: all")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--rows", type=int, default=250_000, help="rows per shard")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default="/tmp", help="where the data goes (deleted afterwards)")
    args = parser.parse_args()
    parts = args.part or list(PARTS)
    tmp = Path(tempfile.mkdtemp(prefix="cnnbal_bench_scale_", dir=args.tmp))
    try:
        start = time.perf_counter()
        shards = make_shards(tmp / "shards", args.shards, args.rows, args.classes)
        size = sum(p.stat().st_size for p in shards.rglob("*.parquet")) / 2**30
        print(
            f"# bench_scale: {args.shards} shards x {args.rows:,} rows x {args.classes} classes "
            f"float32 ({size:.2f} GiB parquet, made in {time.perf_counter() - start:.0f} s), "
            f"{os.cpu_count()} cores, {args.repeats} repeats\n"
        )
        h_path = fit_h(shards, tmp)
        if "apply" in parts:
            bench_apply(tmp, shards, h_path, args.repeats)
        if "dask" in parts:
            bench_dask(tmp, shards, h_path, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # Dask's LocalCluster spawns processes: keep the guard
    main()
