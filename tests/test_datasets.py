"""Datasets: what a folder, a glob, several paths or a URI mean, and the checks before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnbal.cli import app
from cnnbal.errors import CnnbalError
from cnnbal.io import ReadOptions, open_dataset
from tests.conftest import make_outputs, write_csv, write_parquet

NAMES = list("abcdef")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def shards(tmp_path):
    """Four parquet shards in two hive partitions, plus files a listing must skip."""
    probs, labels = make_outputs(2400, 6, seed=3)
    root = tmp_path / "shards"
    for i in range(4):
        part = root / f"day={1 + i // 2}"
        part.mkdir(parents=True, exist_ok=True)
        rows = slice(600 * i, 600 * (i + 1))
        write_parquet(
            part / f"part-{i}.parquet",
            probs[rows],
            labels[rows],
            class_names=NAMES,
            extra={"id": np.arange(600 * i, 600 * (i + 1))},
        )
    (root / "_SUCCESS").write_text("")
    (root / ".part-9.parquet.tmp").write_text("partial")
    (root / "README.txt").write_text("not a shard")
    return root, probs, labels


def test_a_folder_is_its_supported_files_sorted_with_hive_partitions(shards):
    root, *_ = shards
    dataset = open_dataset(root)
    assert [s.relpath for s in dataset.shards] == [
        "day=1/part-0.parquet",
        "day=1/part-1.parquet",
        "day=2/part-2.parquet",
        "day=2/part-3.parquet",
    ]
    assert [s.partition for s in dataset.shards] == [(("day", "1"),)] * 2 + [(("day", "2"),)] * 2
    assert dataset.n_rows == 2400 and dataset.n_classes == 6 and dataset.class_names == NAMES
    assert dataset.kind == "table" and dataset.label == f"{root} (4 shards)"


def test_a_glob_several_paths_and_a_file_uri_name_the_same_shards(shards):
    root, *_ = shards
    by_glob = open_dataset(str(root / "*" / "*.parquet"))
    by_recursive_glob = open_dataset(str(root / "**" / "*.parquet"))
    by_paths = open_dataset([root / "day=1", root / "day=2"])
    by_uri = open_dataset(root.as_uri())
    expected = [str(p) for p in sorted(root.glob("*/*.parquet"))]
    for dataset in (by_glob, by_recursive_glob, by_uri):
        assert [s.location for s in dataset.shards] == expected
    # several folders: names relative to each folder
    assert [s.relpath for s in by_paths.shards] == [
        "part-0.parquet",
        "part-1.parquet",
        "part-2.parquet",
        "part-3.parquet",
    ]
    one = open_dataset((root / "day=1" / "part-0.parquet").as_uri())
    assert one.is_single_file and one.label == "part-0.parquet" and one.n_rows == 600


def test_shards_stream_validated_chunks_with_integer_labels(shards):
    root, probs, labels = shards
    dataset = open_dataset(root, require_labels=True)
    got_probs, got_labels = [], []
    for shard in dataset.shards:
        for chunk in shard.open(chunk_rows=250, require_labels=True).chunks:
            got_probs.append(chunk.probs)
            got_labels.append(chunk.labels)
    np.testing.assert_array_equal(np.concatenate(got_probs), probs)
    np.testing.assert_array_equal(np.concatenate(got_labels), labels)


def test_string_labels_are_mapped_through_the_class_names(tmp_path):
    probs, labels = make_outputs(50, 6, seed=1)
    write_parquet(tmp_path / "a.parquet", probs, np.array(NAMES)[labels], class_names=NAMES)
    (shard,) = open_dataset(tmp_path, require_labels=True).shards
    (chunk,) = shard.open(require_labels=True).chunks
    np.testing.assert_array_equal(chunk.labels, labels)


def test_npz_and_npy_shards_report_rows_from_their_headers(tmp_path):
    probs, labels = make_outputs(300, 6, seed=2)
    np.savez_compressed(tmp_path / "a.npz", probs=probs[:100], labels=labels[:100])
    np.savez(tmp_path / "b.npz", probs=probs[100:], labels=labels[100:])
    dataset = open_dataset(tmp_path, require_labels=True)
    assert [s.n_rows for s in dataset.shards] == [100, 200] and dataset.kind == "array"
    np.save(tmp_path / "c.npy", probs)
    assert open_dataset(tmp_path / "c.npy").n_rows == 300


@pytest.mark.parametrize(
    ("make_odd", "message"),
    [
        (
            lambda d, p, y: write_parquet(
                d / "z.parquet",
                p[:, :5] / p[:, :5].sum(1, keepdims=1),
                y % 5,
                class_names=NAMES[:5],
            ),
            "z.parquet: 5 classes, but a.parquet has 6",
        ),
        (
            lambda d, p, y: write_parquet(d / "z.parquet", p, y, class_names=list("abcdeX")),
            "z.parquet: class names differ from a.parquet at class 5 ('X' vs 'f')",
        ),
        (
            lambda d, p, y: write_parquet(d / "z.parquet", p, y, layout="p_", class_names=NAMES),
            "z.parquet: columns differ from a.parquet (scores p_0..p_5, labels label vs "
            "scores probs, labels label)",
        ),
        (
            lambda d, p, y: np.savez(d / "z.npz", probs=p, labels=y, class_names=NAMES),
            "z.npz: an array file, but a.parquet is a table file (every shard must have the same "
            "layout)",
        ),
        (
            lambda d, p, y: write_parquet(d / "z.parquet", p, y),
            "z.parquet: class names differ from a.parquet (z.parquet has none)",
        ),
    ],
    ids=["classes", "names", "layout", "kind", "no-names"],
)
def test_the_first_shard_that_differs_is_named_before_any_work(tmp_path, make_odd, message):
    probs, labels = make_outputs(100, 6, seed=4)
    write_parquet(tmp_path / "a.parquet", probs, labels, class_names=NAMES)
    write_parquet(tmp_path / "b.parquet", probs, labels, class_names=NAMES)
    make_odd(tmp_path, probs, labels)
    with pytest.raises(CnnbalError) as err:
        open_dataset(tmp_path)
    assert str(err.value) == message


def test_a_shard_without_labels_is_refused_when_labels_are_needed(tmp_path):
    probs, labels = make_outputs(100, 6, seed=4)
    write_parquet(tmp_path / "a.parquet", probs, labels)
    write_parquet(tmp_path / "b.parquet", probs)
    with pytest.raises(CnnbalError, match=r"^b.parquet: no labels found"):
        open_dataset(tmp_path, require_labels=True)
    # apply needs no labels, but every shard must still have the same columns
    with pytest.raises(CnnbalError, match=r"^b.parquet: columns differ .* labels none vs"):
        open_dataset(tmp_path)
    assert open_dataset(tmp_path / "b.parquet").n_rows == 100


@pytest.mark.parametrize(
    ("setup", "pattern"),
    [
        (
            lambda d: (d / "loop").symlink_to(d),
            r"directory already visited as .*symbolic link loop",
        ),
        (
            lambda d: (d / "self.parquet").symlink_to(d / "self.parquet"),
            r"self.parquet: a symbolic link to nothing",
        ),
        (lambda d: None, None),  # control: the folder alone is fine
    ],
    ids=["dir-loop", "self-link", "control"],
)
def test_symlink_loops_are_one_line_errors(tmp_path, setup, pattern):
    probs, labels = make_outputs(50, 6, seed=5)
    data = tmp_path / "data"
    data.mkdir()
    write_parquet(data / "a.parquet", probs, labels)
    setup(data)
    if pattern is None:
        assert len(open_dataset(data).shards) == 1
        return
    with pytest.raises(CnnbalError, match=pattern):
        open_dataset(data)


def test_nothing_found_and_duplicates_are_errors(tmp_path):
    probs, labels = make_outputs(50, 6, seed=6)
    (tmp_path / "empty").mkdir()
    write_parquet(tmp_path / "a.parquet", probs, labels)
    (tmp_path / "sub").mkdir()
    write_parquet(tmp_path / "sub" / "a.parquet", probs, labels)
    cases = {
        str(tmp_path / "empty"): "is a directory with no .npz, .npy, .parquet or .csv file in it",
        str(tmp_path / "missing.parquet"): "no such file or directory",
        str(tmp_path / "*.csv"): "no .npz, .npy, .parquet or .csv file matches",
        "ftp://host/x.parquet": "unsupported URI scheme 'ftp://'",
    }
    for item, message in cases.items():
        with pytest.raises(CnnbalError, match=message):
            open_dataset(item)
    with pytest.raises(CnnbalError, match="given twice"):
        open_dataset([tmp_path / "a.parquet", tmp_path / "sub" / ".." / "a.parquet"])
    with pytest.raises(CnnbalError, match="same relative name 'a.parquet'"):
        open_dataset([tmp_path / "a.parquet", tmp_path / "sub" / "a.parquet"])


def test_labels_flag_needs_a_single_npy(tmp_path):
    probs, labels = make_outputs(50, 6, seed=7)
    np.save(tmp_path / "a.npy", probs)
    np.save(tmp_path / "b.npy", probs)
    np.save(tmp_path / "y.npy", labels)
    assert open_dataset(tmp_path / "a.npy", ReadOptions(labels_path=tmp_path / "y.npy")).n_rows
    with pytest.raises(CnnbalError, match="--labels works with a single .npy input"):
        open_dataset([tmp_path / "a.npy", tmp_path / "b.npy"], ReadOptions(labels_path="y.npy"))


def test_csv_and_parquet_shards_with_the_same_columns_mix(tmp_path):
    probs, labels = make_outputs(100, 6, seed=8)
    write_parquet(tmp_path / "a.parquet", probs[:50], labels[:50], layout="p_")
    write_csv(tmp_path / "b.csv", probs[50:], labels[50:])
    dataset = open_dataset(tmp_path, require_labels=True)
    assert [s.n_rows for s in dataset.shards] == [50, None] and dataset.n_rows is None


# ------------------------------------------------------------------ fit / evaluate on a dataset


def test_fit_and_evaluate_on_a_folder_equal_the_concatenated_file(shards, tmp_path):
    root, probs, labels = shards
    whole = write_parquet(tmp_path / "whole.parquet", probs, labels, class_names=NAMES)
    for target, name in ((root, "H_shards.npz"), (whole, "H_whole.npz")):
        result = run("fit", "--force", target, "-o", tmp_path / name, "--jobs", "1")
        assert result.exit_code == 0, result.output
    h_shards = np.load(tmp_path / "H_shards.npz")["H"]
    h_whole = np.load(tmp_path / "H_whole.npz")["H"]
    np.testing.assert_allclose(h_shards, h_whole, rtol=0, atol=1e-10)

    reports = []
    for target in (root, whole):
        result = run("evaluate", target, "-H", tmp_path / "H_whole.npz", "--json", "--jobs", "1")
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    assert reports[0]["metrics"] == reports[1]["metrics"]
    assert reports[0]["shards"] == 4 and reports[1]["shards"] == 1


def test_fit_on_several_globs_and_paths(shards, tmp_path):
    root, *_ = shards
    result = run(
        "fit",
        "--force",
        str(root / "day=1" / "*.parquet"),
        root / "day=2",
        "-o",
        tmp_path / "H.npz",
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["shards"] == 4 and summary["n_val"] == 2400


def test_a_mismatched_shard_is_one_line_from_the_real_command(tmp_path):
    """A real subprocess: exit 2, one `error:` line naming the shard, no traceback, no output."""
    probs, labels = make_outputs(100, 6, seed=9)
    write_parquet(tmp_path / "a.parquet", probs, labels)
    four = probs[:, :4] / probs[:, :4].sum(1, keepdims=True)
    write_parquet(tmp_path / "b.parquet", four, labels % 4)
    (tmp_path / "loop").symlink_to(tmp_path)
    env = dict(os.environ, COLUMNS="200")
    for args, expected in (
        ([str(tmp_path / "*.parquet")], "error: b.parquet: 4 classes, but a.parquet has 6"),
        ([str(tmp_path)], "symbolic link loop"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "cnnbal", "fit", *args, "-o", str(tmp_path / "H.npz")],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
        assert not (tmp_path / "H.npz").exists()


def test_the_local_engine_never_imports_dask(shards, tmp_path):
    root, *_ = shards
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cnnbal.cli import app\n"
        f"r = CliRunner().invoke(app, ['fit', '--force', {str(root)!r}, '--jobs', '1'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'dask' not in sys.modules and 'distributed' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_missing_dask_is_a_one_line_error(shards, monkeypatch):
    root, *_ = shards
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # import fails as if absent
    result = run("fit", root, "--engine", "dask")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --engine dask needs Dask: pip install 'cnnbal[dask]'"
    assert run("fit", root, "--scheduler", "tcp://x:1").stderr.strip() == (
        "error: --scheduler needs --engine dask"
    )
    assert "must be one of local, dask" in run("fit", root, "--engine", "spark").stderr


def test_cli_accepts_a_file_uri(shards, tmp_path):
    root, *_ = shards
    result = run("evaluate", root.as_uri(), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_samples"] == 2400


def test_a_path_is_relative_posix_even_from_a_nested_glob(tmp_path):
    probs, labels = make_outputs(40, 6, seed=10)
    (tmp_path / "a" / "b").mkdir(parents=True)
    write_parquet(tmp_path / "a" / "b" / "x.parquet", probs, labels)
    (shard,) = open_dataset(str(tmp_path / "a" / "**" / "*.parquet")).shards
    assert shard.relpath == "b/x.parquet" and Path(shard.location).is_file()


def test_a_remote_uri_is_listed_and_read_through_its_pyarrow_filesystem(tmp_path, monkeypatch):
    """s3:// stands in for any remote filesystem: a SubTreeFileSystem is not a local one,
    so listing, headers, streaming and the apply record all go through pyarrow's API."""
    import pyarrow.fs as pafs

    probs, labels = make_outputs(900, 6, seed=12)
    bucket = tmp_path / "bucket"
    (bucket / "run" / "day=1").mkdir(parents=True)
    write_parquet(bucket / "run/day=1/a.parquet", probs[:300], labels[:300], class_names=NAMES)
    np.savez(bucket / "run/day=1/b.npz", probs=probs[300:600], labels=labels[300:600])
    remote = pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem())

    def from_uri(uri):
        assert uri.startswith("s3://bucket")
        return remote, uri[len("s3://bucket/") :]

    monkeypatch.setattr("cnnbal.io.datasets._filesystem_from_uri", from_uri)
    with pytest.raises(CnnbalError, match="day=1/b.npz: an array file, but day=1/a.parquet"):
        open_dataset("s3://bucket/run/")
    dataset = open_dataset("s3://bucket/run/**/*.parquet", require_labels=True)
    (shard,) = dataset.shards
    assert shard.relpath == "day=1/a.parquet" and shard.partition == (("day", "1"),)
    assert shard.filesystem is remote and dataset.class_names == NAMES
    (chunk,) = shard.open(require_labels=True).chunks
    np.testing.assert_array_equal(chunk.labels, labels[:300])
    (npz,) = open_dataset("s3://bucket/run/day=1/b.npz", require_labels=True).shards
    (chunk,) = npz.open(require_labels=True).chunks
    np.testing.assert_array_equal(chunk.probs, probs[300:600])

    write_parquet(tmp_path / "val.parquet", probs[600:], labels[600:], class_names=NAMES)
    assert run("fit", "--force", tmp_path / "val.parquet", "-o", tmp_path / "H.npz").exit_code == 0
    result = run("apply", tmp_path / "H.npz", "s3://bucket/run/day=1/a.parquet", "-o",
                 f"{tmp_path / 'out'}/", "--jobs", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "a.parquet").exists()
    result = run("evaluate", "s3://bucket/run/**/*.parquet", "--json", "--jobs", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_samples"] == 300


def test_a_glob_may_match_folders_of_shards(tmp_path):
    """Spark writes a "table.parquet" folder of part files; a glob over such folders takes them."""
    probs, labels = make_outputs(120, 6, seed=13)
    for i, name in enumerate(("a.parquet", "b.parquet")):
        (tmp_path / "run" / name).mkdir(parents=True)
        for j in range(2):
            rows = slice(60 * i + 30 * j, 60 * i + 30 * (j + 1))
            write_parquet(tmp_path / "run" / name / f"part-{j}.parquet", probs[rows], labels[rows])
    for pattern in ("run/*.parquet", "run/**/*.parquet"):
        dataset = open_dataset(str(tmp_path / pattern))
        assert [s.relpath for s in dataset.shards] == [
            "a.parquet/part-0.parquet",
            "a.parquet/part-1.parquet",
            "b.parquet/part-0.parquet",
            "b.parquet/part-1.parquet",
        ], pattern


def test_other_methods_fit_on_a_folder_in_memory_and_evaluate_streamed(shards, tmp_path):
    """Methods that are not sums over rows read the shards whole; evaluate streams any kind."""
    root, probs, labels = shards
    whole = write_parquet(tmp_path / "whole.parquet", probs, labels, class_names=NAMES)
    for target, name in ((root, "B_shards.npz"), (whole, "B_whole.npz")):
        result = run("fit", target, "--method", "logit-adjust", "-o", tmp_path / name, "-j", "1")
        assert result.exit_code == 0, result.output
    with np.load(tmp_path / "B_shards.npz") as a, np.load(tmp_path / "B_whole.npz") as b:
        assert str(a["kind"]) == "logit_bias"
        np.testing.assert_array_equal(a["bias"], b["bias"])
    reports = []
    for target in (root, whole):
        result = run("evaluate", target, "-H", tmp_path / "B_whole.npz", "--json", "-j", "1")
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    assert reports[0]["metrics"] == reports[1]["metrics"]


def test_the_fit_check_covers_a_dataset_and_says_when_it_is_too_large(
    shards, tmp_path, monkeypatch
):
    """The synthetic shards have weak classes that the paper's H hurts: refused on a dataset too."""
    root, *_ = shards
    result = run("fit", root, "-o", tmp_path / "H.npz", "--jobs", "1")
    assert result.exit_code == 1 and not (tmp_path / "H.npz").exists()
    assert "FAILED: fit check on " in result.stderr and "(4 shards)" in result.stderr
    import cnnbal.cli

    monkeypatch.setattr(cnnbal.cli, "FIT_CHECK_MAX_CELLS", 1000)
    result = run("fit", root, "-o", tmp_path / "H.npz", "--jobs", "1")
    assert result.exit_code == 0 and (tmp_path / "H.npz").exists()
    assert "fit check skipped: 2,400 rows x 6 classes" in " ".join(result.stderr.split())
