"""What cnnbal guarantees about the files it writes and the way it exits.

Outputs: never an input, never two outputs on one file, the suffix of the
format written, the mode ``open()`` would give, any legal name; signals and
full disks: one line, exit code, no temporary file left.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnbal.cli import app
from cnnbal.errors import CnnbalError
from cnnbal.io import atomic_output, check_outputs
from cnnbal.pipeline import fit_file
from tests.conftest import make_outputs, write_parquet


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def val(tmp_path):
    probs, labels = make_outputs(400, 4, seed=2, weak=())
    path = tmp_path / "val.npz"
    np.savez(path, probs=probs, labels=labels)
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- which paths may be written


def test_check_outputs_refuses_inputs_links_and_one_file_twice(tmp_path):
    src = tmp_path / "in.npz"
    src.write_bytes(b"x")
    (tmp_path / "link.npz").symlink_to(src)
    os.link(src, tmp_path / "hard.npz")
    for alias in ("in.npz", "link.npz", "hard.npz", "./in.npz"):
        with pytest.raises(CnnbalError, match="refusing to overwrite the input file"):
            check_outputs({"-o": tmp_path / alias}, {"VAL": src})
    out = tmp_path / "out.png"
    (tmp_path / "out-link.png").symlink_to(out)  # to a file that does not exist yet
    with pytest.raises(CnnbalError, match="-o and --plot name the same file"):
        check_outputs({"-o": out, "--plot": tmp_path / "out-link.png"}, {})
    with pytest.raises(CnnbalError, match="-o must end with .npz"):
        check_outputs({"-o": tmp_path / "H.parquet"}, {}, suffixes={"-o": (".npz",)})
    check_outputs(
        {"-o": tmp_path / "H.NPZ", "--plot": None}, {"VAL": src}, suffixes={"-o": [".npz"]}
    )


def test_sweep_refuses_to_write_over_an_input_before_sweeping(val, tmp_path):
    test = tmp_path / "test.npz"
    test.write_bytes(val.read_bytes())
    before = test.read_bytes()
    result = run("sweep", val, "--test", test, "-o", test)
    assert result.exit_code == 2 and "(-o and --test name the same file)" in result.stderr
    assert test.read_bytes() == before


# ---------------------------------------------------------------- outputs a colleague can use


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_open_would_give(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_output(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"data")
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == mode


def test_a_replaced_output_keeps_its_mode(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    target.chmod(0o640)
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o640


def test_fit_output_mode_follows_the_umask_in_a_real_subprocess(val, tmp_path):
    target = tmp_path / "H.npz"
    result = subprocess.run(
        [sys.executable, "-m", "cnnbal", "fit", val, "-o", target],
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o027),
    )
    assert result.returncode == 0, result.stderr
    assert target.stat().st_mode & 0o777 == 0o640


def test_a_250_byte_output_name_works(val, tmp_path):
    name = "H" * 246 + ".npz"  # NAME_MAX is 255 bytes; the temporary name must fit too
    result = run("fit", val, "-o", tmp_path / name)
    assert result.exit_code == 0, result.output
    assert (tmp_path / name).is_file() and _leftovers(tmp_path) == []
    applied = tmp_path / ("é" * 123 + ".npz")  # 250 bytes of UTF-8
    assert run("apply", tmp_path / name, val, "-o", applied).exit_code == 0
    assert applied.is_file()


def test_suffix_must_match_the_format_written(val, tmp_path):
    result = run("fit", val, "-o", tmp_path / "H.parquet")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'H.parquet'}: -o must end with .npz (the format written), "
        "got '.parquet'"
    ]
    assert not (tmp_path / "H.parquet").exists()


# ---------------------------------------------------------------- signals and full disks


def _big_apply_input(tmp_path, n_rows=400_000):
    probs, labels = make_outputs(n_rows, 10, seed=4, weak=())
    source = write_parquet(tmp_path / "big.parquet", probs, labels, layout="p_")
    fit_file(source, tmp_path / "H.npz")
    return source


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_mid_apply_clean_up_and_exit_128_plus_signal(tmp_path, signum):
    source = _big_apply_input(tmp_path)
    before = source.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnbal", "apply", tmp_path / "H.npz", source, "-o",
         out / "corrected.csv"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not _leftovers(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # wait until the temporary output exists: apply is writing
    assert _leftovers(out), "apply finished before the signal could be sent"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert stderr.strip().splitlines() == [f"interrupted by {signal.Signals(signum).name}"]
    assert list(out.iterdir()) == []  # neither the output nor its temporary file
    assert source.read_bytes() == before


def test_sigterm_mid_dataset_keeps_finished_shards_and_removes_the_open_ones(tmp_path):
    """One process pipelines through the shards: when the signal comes, the last shard
    may be closing while the next one is being written; both temporary files go."""
    import pyarrow.parquet as pq

    probs, labels = make_outputs(150_000, 10, seed=4, weak=())
    fit_file(write_parquet(tmp_path / "val.parquet", probs[:2000], labels[:2000]),
             tmp_path / "H.npz")  # fmt: skip
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(6):
        rows = slice(25_000 * i, 25_000 * (i + 1))
        write_parquet(shards / f"part-{i}.parquet", probs[rows], labels[rows], layout="p_")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnbal", "apply", tmp_path / "H.npz", shards, "-o", out,
         "--jobs", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    finished = []
    while proc.poll() is None and time.monotonic() < deadline:
        if out.is_dir():
            finished = [p for p in out.iterdir() if not p.name.startswith(".")]
            if finished and _leftovers(out):
                break  # one shard in place, another being written
        time.sleep(0.002)
    assert proc.poll() is None, "apply finished before the signal could be sent"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert _leftovers(out) == []
    kept = sorted(p.name for p in out.iterdir())
    assert 1 <= len(kept) < 6
    for name in kept:  # every output in place is whole
        assert pq.read_metadata(out / name).num_rows == 25_000


def test_a_full_disk_during_apply_to_npy_is_one_line_naming_the_output(tmp_path):
    """A file-size limit stands in for a full disk: writes fail with an OSError.

    With a memory-mapped output this was a SIGBUS (exit 135, no message, the
    temporary file left); ordinary writes fail at the write call instead.
    """
    probs, _ = make_outputs(100_000, 10, seed=6, weak=())
    source = tmp_path / "big.npy"
    np.save(source, probs)
    val_probs, val_labels = make_outputs(400, 10, seed=7, weak=())
    np.savez(tmp_path / "val.npz", probs=val_probs, labels=val_labels)
    fit_file(tmp_path / "val.npz", tmp_path / "H.npz")
    out = tmp_path / "out"
    out.mkdir()
    limit = 1 << 20  # 1 MiB; the output needs 4 MB

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "cnnbal", "apply", tmp_path / "H.npz", source, "-o",
         out / "corrected.npy"],
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {out / 'corrected.npy'}: cannot write")
    assert list(out.iterdir()) == []


def test_apply_to_npy_streams_the_same_array_as_before(tmp_path):
    probs, labels = make_outputs(150_000, 5, seed=8, weak=())  # three blocks of rows
    np.save(tmp_path / "in.npy", probs)
    np.savez(tmp_path / "val.npz", probs=probs[:2000], labels=labels[:2000])
    fit_file(tmp_path / "val.npz", tmp_path / "H.npz")
    assert (
        run("apply", tmp_path / "H.npz", tmp_path / "in.npy", "-o", tmp_path / "out.npy").exit_code
        == 0
    )
    from cnnbal.artifact import load_artifact
    from cnnbal.pipeline import correct

    expected = correct(load_artifact(tmp_path / "H.npz"), probs)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
