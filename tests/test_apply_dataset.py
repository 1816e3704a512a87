"""apply on a dataset: a mirrored output folder, parallel shards, re-runs, and the H record."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cnnbal.artifact import load_artifact
from cnnbal.cli import app
from cnnbal.core import apply_correction, argmax_rows
from cnnbal.engine import LocalEngine
from cnnbal.io import open_dataset
from cnnbal.pipeline import apply_dataset
from tests.conftest import make_outputs, write_csv, write_parquet

NAMES = list("abcdef")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def job(tmp_path):
    """H fitted on a validation file, and 4 test shards in 2 hive partitions."""
    probs, labels = make_outputs(3000, 6, seed=21)
    write_parquet(tmp_path / "val.parquet", probs[:600], labels[:600], class_names=NAMES)
    assert run("fit", "--force", tmp_path / "val.parquet", "-o", tmp_path / "H.npz").exit_code == 0
    root = tmp_path / "shards"
    for i in range(4):
        part = root / f"day={1 + i // 2}"
        part.mkdir(parents=True, exist_ok=True)
        rows = slice(600 + 600 * i, 1200 + 600 * i)
        write_parquet(
            part / f"part-{i}.parquet",
            probs[rows],
            labels[rows],
            class_names=NAMES,
            extra={"id": np.arange(rows.start, rows.stop)},
        )
    return tmp_path, root, probs[600:], labels[600:]


def test_apply_on_a_folder_mirrors_it_and_corrects_every_row(job):
    tmp, root, probs, _ = job
    result = run("apply", tmp / "H.npz", root, "-o", tmp / "out", "--jobs", "1", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["shards"] == 4 and summary["rows"] == 2400 and summary["skipped"] == 0
    outputs = sorted(str(p.relative_to(tmp / "out")) for p in (tmp / "out").rglob("*.parquet"))
    assert outputs == [str(p.relative_to(root)) for p in sorted(root.rglob("*.parquet"))]
    # the output folder is a hive dataset again: the partition column comes back
    table = pads.dataset(tmp / "out", partitioning="hive").to_table()
    table = table.sort_by("id")
    art = load_artifact(tmp / "H.npz")
    expected = apply_correction(art.H, probs, art.apply_gate)
    got = np.stack(table.column("probs").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(table.column("pred").to_numpy(), argmax_rows(expected))
    assert table.column("day").to_pylist() == [1] * 1200 + [2] * 1200
    assert summary["changed_predictions"] == int(np.sum(argmax_rows(expected) != probs.argmax(1)))


def test_each_shard_equals_the_single_file_apply_byte_for_byte(job):
    tmp, root, *_ = job
    assert run("apply", tmp / "H.npz", root, "-o", tmp / "out", "--jobs", "1").exit_code == 0
    shard = root / "day=2" / "part-3.parquet"
    assert run("apply", tmp / "H.npz", shard, "-o", tmp / "one.parquet").exit_code == 0
    assert (tmp / "one.parquet").read_bytes() == (tmp / "out/day=2/part-3.parquet").read_bytes()


def test_two_processes_write_the_same_bytes_as_one(job):
    tmp, root, *_ = job
    for jobs in ("1", "2"):
        result = run("apply", tmp / "H.npz", root, "-o", tmp / f"out{jobs}", "--jobs", jobs)
        assert result.exit_code == 0, result.output
    for path in sorted((tmp / "out1").rglob("*.parquet")):
        twin = tmp / "out2" / path.relative_to(tmp / "out1")
        assert path.read_bytes() == twin.read_bytes()


def test_every_output_records_the_h_sha256(job, tmp_path):
    tmp, root, probs, labels = job
    digest = sha256(tmp / "H.npz")
    assert run("apply", tmp / "H.npz", root, "-o", tmp / "out").exit_code == 0
    meta = pq.read_schema(tmp / "out/day=1/part-0.parquet").metadata
    assert meta[b"cnnbal.h_sha256"].decode() == digest
    assert json.loads(meta[b"cnnbal.class_names"]) == NAMES
    # npz: an extra member; .npy and CSV: a sidecar OUTPUT.cnnbal.json
    np.savez(tmp / "t.npz", probs=probs[:100], labels=labels[:100])
    np.save(tmp / "t.npy", probs[:100])
    write_csv(tmp / "t.csv", probs[:100], labels[:100])
    for name in ("t.npz", "t.npy", "t.csv"):
        out = tmp / f"o_{name}"
        result = run("apply", tmp / "H.npz", tmp / name, "-o", out)
        assert result.exit_code == 0, result.output
    assert str(np.load(tmp / "o_t.npz")["cnnbal_h_sha256"]) == digest
    for name in ("o_t.npy", "o_t.csv"):
        record = json.loads((tmp / f"{name}.cnnbal.json").read_text())
        assert record["cnnbal.h_sha256"] == digest and record["output"] == name


def test_rerun_skips_shards_done_with_the_same_h_and_overwrite_redoes_them(job):
    tmp, root, *_ = job
    assert run("apply", tmp / "H.npz", root, "-o", tmp / "out").exit_code == 0
    done = tmp / "out/day=1/part-1.parquet"
    done.unlink()  # as if the run had died before this shard
    stamps = {p: p.stat().st_mtime_ns for p in (tmp / "out").rglob("*.parquet")}
    result = run("apply", tmp / "H.npz", root, "-o", tmp / "out", "--json")
    summary = json.loads(result.stdout)
    assert summary["skipped"] == 3 and summary["rows"] == 600 and done.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    result = run("apply", tmp / "H.npz", root, "-o", tmp / "out", "--overwrite", "--json")
    assert json.loads(result.stdout)["skipped"] == 0
    assert all(p.stat().st_mtime_ns != t for p, t in stamps.items())


def test_an_output_from_another_h_is_refused_before_any_work(job):
    tmp, root, probs, labels = job
    assert run("apply", tmp / "H.npz", root, "-o", tmp / "out").exit_code == 0
    write_parquet(tmp / "val2.parquet", probs[:500], labels[:500], class_names=NAMES)
    assert (
        run("fit", "--force", tmp / "val2.parquet", "-o", tmp / "H2.npz", "--beta", "0.5").exit_code
        == 0
    )
    (tmp / "out/day=2/part-3.parquet").unlink()
    result = run("apply", tmp / "H2.npz", root, "-o", tmp / "out")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {tmp / 'out/day=1/part-0.parquet'}: exists with another H; "
        "pass --overwrite to replace it"
    )
    assert not (tmp / "out/day=2/part-3.parquet").exists()  # nothing was started
    assert run("apply", tmp / "H2.npz", root, "-o", tmp / "out", "--overwrite").exit_code == 0


def test_an_already_corrected_input_is_refused_unless_forced(job):
    tmp, root, *_ = job
    assert run("apply", tmp / "H.npz", root, "-o", tmp / "out").exit_code == 0
    result = run("apply", tmp / "H.npz", tmp / "out", "-o", tmp / "twice")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: day=1/part-0.parquet: already corrected by cnnbal")
    assert "--force" in result.stderr and not (tmp / "twice").exists()
    single = tmp / "out/day=1/part-0.parquet"
    result = run("apply", tmp / "H.npz", single, "-o", tmp / "twice.parquet")
    assert result.exit_code == 2 and "already corrected" in result.stderr
    result = run(
        "apply", tmp / "H.npz", single, "-o", tmp / "twice.parquet", "--force",
        "--pred-column", "pred_again",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    names = pq.read_schema(tmp / "twice.parquet").names
    assert "pred" in names and "pred_again" in names


def test_an_input_pred_column_is_refused_unless_another_name_is_given(tmp_path):
    probs, labels = make_outputs(200, 6, seed=2)
    write_parquet(tmp_path / "val.parquet", probs, labels)
    assert run("fit", "--force", tmp_path / "val.parquet", "-o", tmp_path / "H.npz").exit_code == 0
    write_parquet(tmp_path / "t.parquet", probs, labels, extra={"pred": np.zeros(200, int)})
    result = run("apply", tmp_path / "H.npz", tmp_path / "t.parquet", "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2 and not (tmp_path / "o.parquet").exists()
    assert result.stderr.strip() == (
        "error: t.parquet: already has a column 'pred'; name the prediction column with "
        "--pred-column NAME"
    )
    result = run(
        "apply", tmp_path / "H.npz", tmp_path / "t.parquet", "-o", tmp_path / "o.parquet",
        "--pred-column", "pred_cnnbal",
    )  # fmt: skip
    assert result.exit_code == 0
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.column("pred").to_pylist() == [0] * 200  # the input's column, untouched
    assert len(set(table.column("pred_cnnbal").to_pylist())) > 1


@pytest.mark.parametrize("jobs", ["1", "2"])  # one pipeline in this process; worker processes
def test_a_failing_shard_leaves_no_partial_file_and_a_rerun_finishes(job, jobs):
    tmp, root, probs, labels = job
    bad = probs[:600].copy()
    bad[5, 2] = np.nan
    write_parquet(root / "day=2" / "part-9.parquet", bad, labels[:600], class_names=NAMES,
                  extra={"id": np.arange(600)})  # fmt: skip
    result = run("apply", tmp / "H.npz", root, "-o", tmp / "out", "--jobs", jobs)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: part-9.parquet: non-finite value nan at row 5, column 2"
    leftovers = [p for p in (tmp / "out").rglob("*") if p.name.startswith(".")]
    assert leftovers == [] and not (tmp / "out/day=2/part-9.parquet").exists()
    (root / "day=2" / "part-9.parquet").unlink()
    result = run("apply", tmp / "H.npz", root, "-o", tmp / "out", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["shards"] == 4


def test_apply_dataset_api_reports_shards_in_order(job):
    tmp, root, *_ = job
    seen = []
    with LocalEngine(2) as engine:
        report = apply_dataset(
            tmp / "H.npz",
            open_dataset(root),
            tmp / "out",
            engine=engine,
            on_shard=lambda i, r: seen.append(i),
        )
    assert sorted(seen) == [0, 1, 2, 3]
    assert [r.output for r in report.shards] == [
        tmp / "out" / p.relative_to(root) for p in sorted(root.rglob("*.parquet"))
    ]
    assert report.n_rows == 2400 and report.n_skipped == 0


def test_npz_and_csv_shards_keep_their_format(tmp_path):
    probs, labels = make_outputs(900, 6, seed=5)
    np.savez(tmp_path / "val.npz", probs=probs[:300], labels=labels[:300])
    assert run("fit", "--force", tmp_path / "val.npz", "-o", tmp_path / "H.npz").exit_code == 0
    (tmp_path / "in").mkdir()
    np.savez(tmp_path / "in" / "a.npz", probs=probs[300:600], labels=labels[300:600])
    np.savez(tmp_path / "in" / "b.npz", probs=probs[600:], labels=labels[600:])
    result = run("apply", tmp_path / "H.npz", tmp_path / "in", "-o", tmp_path / "out/")
    assert result.exit_code == 0, result.output
    art = load_artifact(tmp_path / "H.npz")
    for name, rows in (("a.npz", slice(300, 600)), ("b.npz", slice(600, 900))):
        got = np.load(tmp_path / "out" / name)
        np.testing.assert_allclose(
            got["probs"], apply_correction(art.H, probs[rows], art.apply_gate), atol=1e-6
        )
        np.testing.assert_array_equal(got["labels"], labels[rows])


def test_a_single_file_to_a_folder_and_a_file_uri(job):
    tmp, root, *_ = job
    shard = root / "day=1" / "part-0.parquet"
    assert run("apply", tmp / "H.npz", shard, "-o", str(tmp / "o") + "/").exit_code == 0
    assert (tmp / "o" / "part-0.parquet").exists()
    result = run("apply", tmp / "H.npz", shard.as_uri(), "-o", tmp / "u.parquet")
    assert result.exit_code == 0, result.output
    assert (tmp / "u.parquet").read_bytes() == (tmp / "o" / "part-0.parquet").read_bytes()
    result = run("apply", tmp / "H.npz", root.as_uri(), "-o", tmp / "uri_out", "--jobs", "1")
    assert result.exit_code == 0 and (tmp / "uri_out/day=2/part-3.parquet").exists()


def test_the_real_command_is_quiet_in_a_pipe(job):
    """A subprocess (stderr is a pipe): no progress bar, one summary line."""
    tmp, root, *_ = job
    proc = subprocess.run(
        [sys.executable, "-m", "cnnbal", "apply", str(tmp / "H.npz"), str(root),
         "-o", str(tmp / "out"), "--jobs", "2"],
        capture_output=True, text=True, timeout=180, env=dict(os.environ, COLUMNS="300"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("apply: 4 shards, 2,400 rows,") and "\x1b" not in proc.stderr
