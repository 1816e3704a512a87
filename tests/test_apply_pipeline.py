"""apply in one process: one reader/writer pipeline straight through every shard."""

from __future__ import annotations

import errno

import numpy as np
import pyarrow.parquet as pq
import pytest

import cnnbal.pipeline as pipeline
from cnnbal._overlap import Overlap
from cnnbal.artifact import load_artifact
from cnnbal.engine import LocalEngine, default_apply_jobs, default_jobs
from cnnbal.errors import CnnbalError
from cnnbal.io import open_dataset
from cnnbal.io.writers import OutputWriteError
from tests.conftest import make_outputs, write_parquet
from tests.test_kernels import reference

K = 5


@pytest.fixture
def shards(tmp_path, monkeypatch):
    """H, and 4 shards of 300 rows read in blocks of 64 (5 blocks a shard, the last short)."""
    probs, labels = make_outputs(1500, K, seed=3)
    val = tmp_path / "val.parquet"
    write_parquet(val, probs[:300], labels[:300], layout="p_")
    from typer.testing import CliRunner

    from cnnbal.cli import app

    result = CliRunner().invoke(app, ["fit", "--force", str(val), "-o", str(tmp_path / "H.npz")])
    assert result.exit_code == 0, result.output
    root = tmp_path / "shards"
    root.mkdir()
    for i in range(4):
        rows = slice(300 + 300 * i, 600 + 300 * i)
        write_parquet(root / f"part-{i}.parquet", probs[rows], labels[rows], layout="p_")

    def small_blocks(plan, shard, out_path):
        (tmp_path / "out").mkdir(exist_ok=True)
        return shard.open(plan.options, chunk_rows=64)

    monkeypatch.setattr(pipeline, "_open_shard", small_blocks)
    return tmp_path, root, probs[300:]


def scores(path):
    table = pq.read_table(path)
    return np.column_stack([table.column(f"p_{j}").to_numpy() for j in range(K)])


def test_every_block_of_every_shard_is_corrected_in_order(shards):
    tmp, root, probs = shards
    seen = []
    report = pipeline.apply_dataset(
        tmp / "H.npz", open_dataset(root), tmp / "out", on_shard=lambda i, r: seen.append(i)
    )
    assert seen == [0, 1, 2, 3]  # one process: shards finish in order
    assert [r.n_rows for r in report.shards] == [300] * 4
    artifact = load_artifact(tmp / "H.npz")
    H, gate = artifact.correction.params["H"], artifact.correction.gate
    for i in range(4):
        got = scores(tmp / "out" / f"part-{i}.parquet")
        want = reference(H, probs[300 * i : 300 * (i + 1)], gate)
        np.testing.assert_allclose(got, want, atol=1e-6 if got.dtype == np.float32 else 1e-12)
        pred = pq.read_table(tmp / "out" / f"part-{i}.parquet").column("pred").to_numpy()
        np.testing.assert_array_equal(pred, got.argmax(axis=1))
    # rows of the 4 blocks of 64 and the short block of 44 all counted
    assert report.n_rows == 1200
    changed = (want.argmax(axis=1) != probs[900:].argmax(axis=1)).sum()
    assert report.shards[3].n_changed == changed


def test_a_failing_block_keeps_the_shards_before_it_and_removes_its_own(shards):
    tmp, root, probs = shards
    bad = probs[600:900].copy()
    bad[200, 1] = np.inf  # block 4 of shard 1: blocks 1-3 were already written
    write_parquet(root / "part-1.parquet", bad, np.zeros(300, dtype=int), layout="p_")
    seen = []
    with pytest.raises(CnnbalError, match=r"part-1.parquet: non-finite value inf at row 200"):
        pipeline.apply_dataset(
            tmp / "H.npz", open_dataset(root), tmp / "out", on_shard=lambda i, r: seen.append(i)
        )
    assert seen == [0]
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["part-0.parquet"]
    np.testing.assert_allclose(scores(tmp / "out/part-0.parquet").sum(axis=1), 1, atol=1e-5)


def test_a_full_disk_at_a_shard_close_is_named_and_leaves_nothing_half_written(shards, monkeypatch):
    tmp, root, _ = shards
    closes = []
    real_close = pipeline._TableSink.close

    def close(self):
        closes.append(1)
        if len(closes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_close(self)

    monkeypatch.setattr(pipeline._TableSink, "close", close)
    with pytest.raises(OutputWriteError, match=r"part-1.parquet: cannot write: No space left"):
        pipeline.apply_dataset(tmp / "H.npz", open_dataset(root), tmp / "out")
    # the first shard is in place; nothing of the second (or a temporary file) remains
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["part-0.parquet"]


def test_one_process_and_two_write_the_same_values(shards, tmp_path):
    tmp, root, _ = shards
    pipeline.apply_dataset(tmp / "H.npz", open_dataset(root), tmp / "one")
    with LocalEngine(2) as engine:
        pipeline.apply_dataset(tmp / "H.npz", open_dataset(root), tmp / "two", engine=engine)
    for i in range(4):
        name = f"part-{i}.parquet"
        np.testing.assert_array_equal(scores(tmp / "one" / name), scores(tmp / "two" / name))


def test_overlap_keeps_order_and_bounds_the_blocks_in_flight():
    import threading

    written, in_flight, most = [], [0], [0]
    lock = threading.Lock()

    def chunks():
        for i in range(20):
            with lock:
                in_flight[0] += 1
                most[0] = max(most[0], in_flight[0])
            yield i

    def write(i):
        with lock:
            in_flight[0] -= 1
        written.append(i)

    with Overlap(depth=2) as overlap:
        for i in overlap.read_ahead(chunks()):
            overlap.write_behind(write, i)
        overlap.drain()
    assert written == list(range(20))
    # read ahead (2) + this one + written behind (2)
    assert most[0] <= 5


def test_apply_defaults_to_half_the_cores():
    assert default_apply_jobs() == max(1, default_jobs() // 2)


def test_a_process_with_one_core_reads_corrects_and_writes_in_turn(shards, monkeypatch):
    import threading

    import cnnbal.engine

    tmp, root, _ = shards
    pipeline.apply_dataset(tmp / "H.npz", open_dataset(root), tmp / "threaded")
    writers = set()
    real_write = pipeline._ShardRun.write

    def write(self, *args):
        writers.add(threading.current_thread().name)
        real_write(self, *args)

    monkeypatch.setattr(pipeline._ShardRun, "write", write)
    monkeypatch.setattr(cnnbal.engine, "_worker_cores", 1)  # a worker's share: one core
    pipeline.apply_dataset(tmp / "H.npz", open_dataset(root), tmp / "inline")
    assert writers == {threading.main_thread().name}
    for i in range(4):
        name = f"part-{i}.parquet"
        assert (tmp / "inline" / name).read_bytes() == (tmp / "threaded" / name).read_bytes()


def test_overlap_without_threads_keeps_order_and_raises_at_once():
    written = []
    with Overlap(depth=0) as overlap:
        for i in overlap.read_ahead(range(5)):
            overlap.write_behind(written.append, i)
        overlap.drain()
    assert written == [0, 1, 2, 3, 4]

    def boom(i):
        raise OSError("disk on fire")

    with Overlap(depth=0) as overlap, pytest.raises(OSError, match="disk on fire"):
        for i in overlap.read_ahead(range(5)):
            overlap.write_behind(boom, i)
        overlap.drain()


def test_rows_are_reported_after_each_block_in_one_process_and_each_shard_in_several(shards):
    tmp, root, _ = shards
    seen = []
    pipeline.apply_dataset(tmp / "H.npz", open_dataset(root), tmp / "one", on_rows=seen.append)
    # 4 shards of 300 rows in blocks of 64: 64, 128, 192, 256, 300, 364, ...
    per_shard = [64, 128, 192, 256, 300]
    assert seen == [300 * i + n for i in range(4) for n in per_shard]
    seen.clear()
    with LocalEngine(2) as engine:
        pipeline.apply_dataset(
            tmp / "H.npz", open_dataset(root), tmp / "two", engine=engine, on_rows=seen.append
        )
    assert seen == [300, 600, 900, 1200]


def test_the_progress_bar_counts_rows_as_blocks_finish(shards, monkeypatch):
    """On a terminal the bar moves with every block, and ends at every row of the dataset."""
    from typer.testing import CliRunner

    import cnnbal.cli

    tmp, root, _ = shards
    updates = []

    class Bar:
        def __init__(self, single):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add_task(self, *args, total=None, **kwargs):
            updates.append(("total", total))
            return 0

        def update(self, task, completed=None, **kwargs):
            updates.append((completed, kwargs.get("shards")))

    monkeypatch.setattr(cnnbal.cli, "show_progress", lambda: True)
    monkeypatch.setattr(cnnbal.cli, "_progress_bar", Bar)
    args = ["apply", str(tmp / "H.npz"), str(root), "-o", str(tmp / "out"), "--jobs", "1"]
    result = CliRunner().invoke(cnnbal.cli.app, args)
    assert result.exit_code == 0, result.output
    assert updates[0] == ("total", 1200)
    rows = [completed for completed, _ in updates[1:]]
    assert rows == sorted(rows) and rows[-1] == 1200 and len(rows) >= 20
    assert updates[-1] == (1200, "4/4")
    # a re-run skips every shard: the bar still ends full
    updates.clear()
    result = CliRunner().invoke(cnnbal.cli.app, args)
    assert result.exit_code == 0, result.output
    assert updates[-1] == (1200, "4/4")


def test_blocks_hold_about_the_same_number_of_values_for_any_class_count():
    assert pipeline.apply_chunk_rows(10) == pipeline.apply_chunk_rows(100) == 65_536
    assert pipeline.apply_chunk_rows(1_000) == 6_553
    assert pipeline.apply_chunk_rows(100_000) == 1_024  # never fewer rows
    assert pipeline.apply_chunk_rows(None) == 65_536


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_many_classes_are_read_in_smaller_blocks(tmp_path, monkeypatch):
    # K = 2,000: blocks of 3,276 rows, so 7,000 rows come in 3 blocks
    from cnnbal.artifact import Artifact, save_artifact
    from cnnbal.core import fit

    k = 2000
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.full(k, 0.05), size=7000).astype(np.float32)
    labels = rng.integers(0, k, size=7000)
    write_parquet(tmp_path / "in.parquet", probs, labels, layout="p_")
    result = fit(probs[:300], labels[:300], n_classes=k)  # few rows: a quick fit
    save_artifact(tmp_path / "H.npz", Artifact.from_fit(result))
    rows = []
    real = pipeline._ShardRun.correct

    def correct(self, chunk):
        rows.append(len(chunk.probs))
        return real(self, chunk)

    monkeypatch.setattr(pipeline._ShardRun, "correct", correct)
    report = pipeline.apply_file(
        tmp_path / "H.npz", tmp_path / "in.parquet", tmp_path / "o.parquet"
    )
    assert rows == [3276, 3276, 448] and report.n_rows == 7000


def test_a_memory_mapped_npy_is_never_read_ahead(tmp_path, monkeypatch):
    """A .npy block's pages are released when the next block is read: reading ahead on
    a thread would release pages the correction still reads (they come back resident
    and stay: 1.1 GB instead of 0.4 GB for an 800 MB file)."""
    import threading

    import cnnbal.io.readers as readers
    from cnnbal.pipeline import evaluate_dataset

    probs, labels = make_outputs(5000, K, seed=8)
    np.save(tmp_path / "big.npy", probs)
    np.save(tmp_path / "labels.npy", labels)
    write_parquet(tmp_path / "val.parquet", probs[:500], labels[:500])
    from cnnbal.pipeline import fit_file

    fit_file(tmp_path / "val.parquet", tmp_path / "H.npz")
    threads = set()
    real = readers._release_rows

    def release(array, start, stop):
        threads.add(threading.current_thread().name)
        real(array, start, stop)

    monkeypatch.setattr(readers, "_release_rows", release)
    pipeline.apply_file(tmp_path / "H.npz", tmp_path / "big.npy", tmp_path / "out.npy")
    options = pipeline.ReadOptions(labels_path=tmp_path / "labels.npy")
    evaluate_dataset(open_dataset(tmp_path / "big.npy", options), load_artifact(tmp_path / "H.npz"))
    assert threads == {threading.main_thread().name}


def test_every_overlap_shares_one_reader_and_one_writer_thread(shards, monkeypatch):
    """New threads per shard made glibc give each a heap arena of its own, and peak
    memory grew with the number of shards."""
    import threading

    import cnnbal.engine
    from cnnbal.pipeline import evaluate_dataset

    monkeypatch.setattr(cnnbal.engine, "_worker_cores", 2)  # threads even on a 1-core runner
    tmp, root, _ = shards
    seen = []
    for _ in range(3):
        pipeline.apply_dataset(tmp / "H.npz", open_dataset(root), tmp / "out", overwrite=True)
        evaluate_dataset(open_dataset(root, require_labels=True), load_artifact(tmp / "H.npz"))
        alive = [t for t in threading.enumerate() if t.name.startswith("cnnbal-")]
        seen.append(alive)
    # the same two threads, kept between runs (and shards), not made anew
    assert len(seen[0]) == 2
    assert all(len(a) == 2 and all(x is y for x, y in zip(a, seen[0], strict=True)) for a in seen)


def test_a_consumer_that_stops_early_leaves_no_read_running():
    import time

    started, finished = [], []

    def slow():
        for i in range(10):
            started.append(i)
            time.sleep(0.01)
            finished.append(i)
            yield i

    with Overlap(depth=2) as overlap:
        for i in overlap.read_ahead(slow()):
            if i == 2:
                break
    assert started == finished  # no next() still running on the abandoned iterator


def test_a_failed_write_of_a_last_block_never_moves_the_file_into_place(shards, monkeypatch):
    """The shard's finish is queued on the writer thread right behind its last write: if
    that write fails, finish must not close and rename the partial file."""
    import time

    tmp, root, _ = shards
    calls = []
    real = pipeline._TableSink.write

    def write(self, *args):
        calls.append(1)
        if len(calls) == 5:  # the last block of the first shard
            time.sleep(0.05)  # the main thread queues finish meanwhile
            raise OSError(errno.EIO, "Input/output error")
        real(self, *args)

    monkeypatch.setattr(pipeline._TableSink, "write", write)
    seen = []
    with pytest.raises(OutputWriteError, match="part-0.parquet: cannot write: Input/output"):
        pipeline.apply_dataset(
            tmp / "H.npz", open_dataset(root), tmp / "out", on_shard=lambda i, r: seen.append(i)
        )
    assert seen == []
    assert list((tmp / "out").iterdir()) == []
