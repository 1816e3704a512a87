"""extract never harms silently (issue 7) and speaks like the other commands (issue 10).

Every failure: exit 2, one ``error:`` line naming the file, nothing left behind,
inputs untouched. The interface: ``-o/--output`` (``--out`` kept, hidden and
deprecated) and ``--json``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL.Image")

import pyarrow.parquet as pq  # noqa: E402

import cnnbal.io  # noqa: E402
from tests.extract.helpers import (  # noqa: E402
    CLASSES,
    REPO_ROOT,
    TORCHSCRIPT_WARNING,
    error_line,
    run_cli,
    snapshot,
    write_png,
)

pytestmark = TORCHSCRIPT_WARNING


def run_cpu(*args):
    return run_cli(*args, "--device", "cpu")


# ---------------------------------------------------------------------------
# Write errors: one line, nothing left behind.


def test_a_folder_that_refuses_the_temporary_file(
    monkeypatch, scripted_path, flat_folder, tmp_path
):
    """A read-only folder or a missing permission (imitated: the tests may run as root)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    @contextlib.contextmanager
    def refused(target, *inputs):
        raise PermissionError(errno.EACCES, "Permission denied", str(out_dir / ".p.tmp"))
        yield  # pragma: no cover

    monkeypatch.setattr(cnnbal.io, "atomic_output", refused)
    result = run_cpu(scripted_path, flat_folder, "-o", out_dir / "p.parquet")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"error: {out_dir / 'p.parquet'}: cannot write the output (Permission denied)"
    )
    assert list(out_dir.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder(scripted_path, flat_folder, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out_dir.chmod(0o555)
    try:
        result = run_cpu(scripted_path, flat_folder, "-o", out_dir / "p.parquet")
    finally:
        out_dir.chmod(0o755)
    assert result.exit_code == 2
    assert "Permission denied" in error_line(result)
    assert list(out_dir.iterdir()) == []


def test_a_full_disk_removes_the_temporary_file(monkeypatch, scripted_path, class_folder, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "p.parquet").write_bytes(b"the previous run")

    def disk_full(self, batch):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cnnbal.io.TableWriter, "write", disk_full)
    result = run_cpu(scripted_path, class_folder, "-o", out_dir / "p.parquet", "--crop", 16)
    assert result.exit_code == 2
    assert error_line(result).endswith("cannot write the output (No space left on device)")
    assert [path.name for path in out_dir.iterdir()] == ["p.parquet"]
    assert (out_dir / "p.parquet").read_bytes() == b"the previous run"


# ---------------------------------------------------------------------------
# Models and factories that fail: exit 2 (exit 1 is a failed check), one line.


@pytest.mark.parametrize(
    ("spec", "size_args", "expected"),
    [
        ("_tiny_model:make_gray_model", ["--crop", 16], "expected input[9, 3, 16, 16] to have 1"),
        ("_tiny_model:make_flat_model", ["--size", 20, "--crop", 18], "mat1 and mat2 shapes"),
    ],
)
def test_a_model_that_fails_on_the_batch(class_folder, tmp_path, spec, size_args, expected):
    result = run_cpu(spec, class_folder, "-o", tmp_path / "p.parquet", *size_args)
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith(f"error: {spec}: the model failed on cpu with a batch of 9 images")
    assert expected in line and "check --channels, --size and --crop" in line
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.parametrize(
    ("module_text", "spec", "expected"),
    [
        (None, "_tiny_model:raising_factory", "the factory raised ValueError (checkpoint"),
        ("def broken(:\n", "broken_module:make", "cannot import broken_module (SyntaxError"),
        (
            "raise RuntimeError('needs a GPU at import')\n",
            "gpu_module:make",
            "cannot import gpu_module (RuntimeError: needs a GPU at import)",
        ),
    ],
)
def test_a_factory_that_raises_or_does_not_import(
    monkeypatch, flat_folder, tmp_path, module_text, spec, expected
):
    if module_text is not None:
        (tmp_path / f"{spec.split(':')[0]}.py").write_text(module_text)
        monkeypatch.syspath_prepend(str(tmp_path))
    result = run_cpu(spec, flat_folder, "-o", tmp_path / "p.parquet")
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith(f"error: {spec}: ") and expected in line


# ---------------------------------------------------------------------------
# Linked folders: followed, each real folder read once.


def test_symlink_loops_do_not_multiply_images(model, tmp_path):
    root = tmp_path / "data"
    for class_index, name in enumerate(CLASSES):
        for image_index in range(4):
            write_png(root / name / f"img{image_index}.png", 16, 16, 10 * class_index + image_index)
    (root / "cat" / "loop").symlink_to(root, target_is_directory=True)  # up to the root
    (root / "dog" / "self").symlink_to(root / "dog", target_is_directory=True)
    (root / "emu" / "deep").mkdir()
    (root / "emu" / "deep" / "back").symlink_to(root / "emu", target_is_directory=True)
    (root / "emu" / "cats").symlink_to(root / "cat", target_is_directory=True)  # read already

    from cnnbal import extract as api

    source = api.discover(root)
    assert len(source) == 12
    assert source.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    out = tmp_path / "p.parquet"
    result = run_cpu(model_file(model, tmp_path), root, "-o", out)
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == 12


def test_a_linked_class_folder_is_read(model, tmp_path):
    """Datasets are often trees of links: a class folder that is a link still counts."""
    store, root = tmp_path / "store", tmp_path / "data"
    for name in CLASSES:
        write_png(store / name / "a.png", 16, 16, seed=len(name))
        (root).mkdir(exist_ok=True)
        (root / name).symlink_to(store / name, target_is_directory=True)
    from cnnbal import extract as api

    assert len(api.discover(root)) == 3


def model_file(model, tmp_path):
    path = tmp_path / "model.pt"
    if not path.exists():
        torch.jit.save(torch.jit.script(model), path)
    return path


# ---------------------------------------------------------------------------
# The output: parquet only, never an input.


@pytest.mark.parametrize("name", ["out.csv", "out", "out.npz", "out.parquet.tmp"])
def test_output_suffix_must_be_parquet(scripted_path, flat_folder, tmp_path, name):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cpu(scripted_path, flat_folder, "-o", out_dir / name)
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith(f"error: {out_dir / name}: extract writes parquet")
    assert "name the output" in line and ".parquet" in line
    assert list(out_dir.iterdir()) == []


def test_output_suffix_is_checked_in_a_real_process(scripted_path, flat_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [str(scripted_path), str(flat_folder), "-o", str(tmp_path / "out.csv")]
    done = subprocess.run(
        [sys.executable, "-m", "cnnbal", "extract", *args, "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {tmp_path / 'out.csv'}: extract writes parquet")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("which", ["classes", "labels", "weights", "model", "array"])
def test_output_naming_an_input_is_refused(model, weights_path, tmp_path, which):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    array, labels, classes = (
        tmp_path / "images.npy",
        tmp_path / "labels.npy",
        tmp_path / "names.txt",
    )
    np.save(array, images)
    np.save(labels, np.array([0, 1, 2]))
    classes.write_text("ant\nbee\ncow\n")
    scripted = model_file(model, tmp_path)
    common = [array, "--labels", labels, "--classes", classes]
    args = {
        "classes": [scripted, *common, "-o", classes],
        "labels": [scripted, *common, "-o", labels],
        "weights": [
            "_tiny_model:make_model",
            *common,
            "--weights",
            weights_path,
            "-o",
            weights_path,
        ],
        "model": [scripted, *common, "-o", scripted],
        "array": [scripted, *common, "-o", array],
    }[which]
    before = snapshot(tmp_path)
    result = run_cpu(*args)
    assert result.exit_code == 2
    assert "is an input file" in error_line(result)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------
# The interface of every command: -o/--output, --json.


def test_out_is_a_hidden_deprecated_alias(scripted_path, flat_folder, tmp_path):
    out = tmp_path / "p.parquet"
    result = run_cpu(scripted_path, flat_folder, "--out", out)
    assert result.exit_code == 0, result.output
    assert "warning: --out is deprecated; use -o/--output" in result.stderr
    assert pq.read_table(out).num_rows == 4
    both = run_cpu(scripted_path, flat_folder, "--out", out, "-o", out)
    assert both.exit_code == 2 and "give only -o" in error_line(both)
    help_text = run_cli("--help").output
    assert "--output" in help_text and "--out " not in help_text and "--tf32" in help_text


def test_missing_output_is_a_usage_error(scripted_path, flat_folder):
    result = run_cpu(scripted_path, flat_folder)
    assert result.exit_code == 2
    assert "-o/--output: missing" in error_line(result)


def test_json_reports_the_run(scripted_path, class_folder, tmp_path):
    out = tmp_path / "p.parquet"
    result = run_cpu(scripted_path, class_folder, "-o", out, "--crop", 16, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out)
    assert summary["rows"] == 9 == pq.read_table(out).num_rows
    assert summary["skipped"] == 0 and summary["skipped_paths"] == []
    assert summary["classes"] == CLASSES and summary["n_classes"] == 3
    assert summary["device"] == "cpu" and summary["amp"] == "none"
    assert summary["precision"] == "float32" and summary["batch_size"] == 64
    assert summary["workers"] == 0
    assert summary["seconds"] >= 0 and summary["setup_seconds"] >= 0
    assert summary["images_per_second"] == pytest.approx(9 / summary["seconds"], rel=1e-6)


def test_json_reports_skipped_images(scripted_path, class_folder, tmp_path):
    broken = class_folder / "dog" / "broken.png"
    broken.write_bytes(b"not a png")
    result = run_cpu(
        scripted_path, class_folder, "-o", tmp_path / "p.parquet", "--crop", 16, "--skip-bad",
        "--json", "--amp", "bf16",
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary["rows"] == 9 and summary["skipped"] == 1
    assert summary["skipped_paths"] == [str(broken)]
    assert summary["amp"] == "bf16" and summary["precision"] == "bf16"


def test_quiet_prints_nothing_but_the_json(scripted_path, flat_folder, tmp_path):
    result = run_cpu(scripted_path, flat_folder, "-o", tmp_path / "p.parquet", "-q", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and json.loads(result.stdout)["rows"] == 4


def test_json_on_an_error(scripted_path, flat_folder, tmp_path):
    result = run_cpu(scripted_path, flat_folder, "-o", tmp_path / "p.csv", "--json")
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == 2
    assert payload["error"].startswith(f"{tmp_path / 'p.csv'}: extract writes parquet")
    assert error_line(result) == f"error: {payload['error']}"
