"""--engine dask: the same per-shard functions on a Dask cluster give the local engine's results.

One LocalCluster of 2 worker processes for the whole module; the CLI reaches it
through --scheduler, as it would reach a cluster on Kubernetes, YARN or HPC.
"""

from __future__ import annotations

import json
import operator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnbal.cli import app
from cnnbal.engine import DaskEngine, LocalEngine, make_engine
from tests.conftest import make_outputs, write_parquet

distributed = pytest.importorskip("dask.distributed")

NAMES = [f"c{i}" for i in range(8)]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def scheduler():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dask")
    probs, labels = make_outputs(6000, 8, seed=31, weak=(0, 3))
    for name, rows in (("val", slice(0, 3000)), ("test", slice(3000, 6000))):
        for i in range(5):  # uneven shard sizes: the tree has an odd level
            part = slice(rows.start + 600 * i, rows.start + 600 * (i + 1))
            folder = tmp / name / f"split={i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            write_parquet(
                folder / f"{name}-{i}.parquet",
                probs[part],
                labels[part],
                class_names=NAMES,
                extra={"id": np.arange(part.start, part.stop)},
            )
    return tmp


def _square(x):
    return x * x


def test_map_keeps_order_and_map_reduce_equals_the_local_tree(scheduler):
    with DaskEngine(scheduler) as engine:
        assert engine.workers == 2
        seen = []
        assert engine.map(_square, list(range(7)), on_result=lambda i, r: seen.append(i)) == [
            i * i for i in range(7)
        ]
        assert sorted(seen) == list(range(7))
        values = [np.float64(1.0) / (i + 3) for i in range(7)]
        tree = engine.map_reduce(partial(operator.mul, 1.0), values, operator.add)
    with LocalEngine(1) as local:
        assert tree == local.map_reduce(partial(operator.mul, 1.0), values, operator.add)


def test_a_failing_task_raises_its_error_here(scheduler):
    with make_engine("dask", scheduler=scheduler) as engine, pytest.raises(ZeroDivisionError):
        engine.map(partial(operator.truediv, 1), [1, 0, 2])


def test_fit_on_dask_equals_the_local_engine(scheduler, data):
    for method in ("elaborated", "naive"):
        out = {}
        for engine in ("local", "dask"):
            path = data / f"H_{method}_{engine}.npz"
            args = ["fit", "--force", data / "val", "-o", path, "--method", method]
            args += ["--engine", engine]
            args += ["--scheduler", scheduler] if engine == "dask" else ["--jobs", "1"]
            result = run(*args)
            assert result.exit_code == 0, result.output
            out[engine] = np.load(path)
        np.testing.assert_allclose(out["dask"]["H"], out["local"]["H"], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(
            out["dask"]["val_class_counts"], out["local"]["val_class_counts"]
        )


def test_evaluate_on_dask_gives_identical_metrics(scheduler, data):
    assert run("fit", "--force", data / "val", "-o", data / "H.npz", "--jobs", "1").exit_code == 0
    reports = {}
    for engine in ("local", "dask"):
        args = ["evaluate", data / "test", "-H", data / "H.npz", "--json", "--engine", engine]
        args += ["--scheduler", scheduler] if engine == "dask" else ["--jobs", "2"]
        result = run(*args)
        assert result.exit_code == 0, result.output
        reports[engine] = json.loads(result.stdout)
    assert reports["dask"]["metrics"] == reports["local"]["metrics"]
    assert reports["dask"]["per_class"] == reports["local"]["per_class"]
    assert reports["dask"]["n_samples"] == 3000


def test_apply_on_dask_writes_byte_identical_outputs(scheduler, data, monkeypatch):
    assert (
        run("fit", "--force", data / "val", "-o", data / "H_apply.npz", "--jobs", "1").exit_code
        == 0
    )
    h = data / "H_apply.npz"
    local = run("apply", h, data / "test", "-o", data / "out_local", "--jobs", "1")
    assert local.exit_code == 0, local.output
    # the scheduler from the environment, as a cluster job would set it
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", scheduler)
    remote = run("apply", h, data / "test", "-o", data / "out_dask", "--engine", "dask", "--json")
    assert remote.exit_code == 0, remote.output
    assert json.loads(remote.stdout)["shards"] == 5
    files = sorted(p.relative_to(data / "out_local") for p in (data / "out_local").rglob("*.*"))
    assert len(files) == 5
    for rel in files:
        assert (data / "out_dask" / rel).read_bytes() == (data / "out_local" / rel).read_bytes()
    again = run("apply", h, data / "test", "-o", data / "out_dask", "--engine", "dask", "--json")
    assert json.loads(again.stdout)["skipped"] == 5
    single = sorted((data / "test").rglob("*.parquet"))[0]
    one = run("apply", h, single, "-o", data / "one.parquet", "--engine", "dask")
    assert one.exit_code == 0, one.output
    twin = data / "out_local" / single.relative_to(data / "test")
    assert (data / "one.parquet").read_bytes() == twin.read_bytes()


def test_an_unreachable_scheduler_is_one_line(data):
    result = run("evaluate", data / "test", "--engine", "dask", "--scheduler", "tcp://127.0.0.1:9")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: tcp://127.0.0.1:9: cannot connect to the Dask scheduler")


def test_without_a_scheduler_a_local_cluster_is_started_and_closed(data):
    result = run("evaluate", data / "test", "--engine", "dask", "--jobs", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_samples"] == 3000
    assert Path(data / "test").is_dir()


def _own_cores():
    from cnnbal.engine import own_cores

    return own_cores()


def test_a_local_cluster_gives_each_worker_its_share_of_the_cores(monkeypatch):
    import cnnbal.engine

    # as if the machine had 8 cores: 2 workers get 4 each (without the share a
    # worker would claim every core of this machine)
    monkeypatch.setattr(cnnbal.engine, "default_jobs", lambda: 8)
    with DaskEngine(jobs=2) as engine:
        shares = engine.client.run(_own_cores)
    assert sorted(shares.values()) == [4, 4]
