"""cnnbal extract: probabilities equal a direct CPU forward pass; layouts, errors, atomic output.

Every comparison with a CPU forward pass pins the CPU (see tests/extract/helpers.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL.Image")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from cnnbal import extract as api  # noqa: E402
from cnnbal.errors import CnnbalError  # noqa: E402
from tests.extract.helpers import (  # noqa: E402
    CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    REPO_ROOT,
    TORCHSCRIPT_WARNING,
    error_line,
    forward,
    read_vectors,
    reference_input,
    run_cli,
    write_png,
)

pytestmark = TORCHSCRIPT_WARNING


def run_cpu(*args):
    """The command pinned to the CPU: its results are compared with a CPU forward pass."""
    return run_cli(*args, "--device", "cpu")


# ---------------------------------------------------------------------------
# Agreement with a direct forward pass; the file format.


@pytest.mark.parametrize("batch_size", [64, 2])
def test_probs_equal_a_direct_forward_pass(model, class_folder, tmp_path, batch_size):
    out = tmp_path / "probs.parquet"
    source = api.discover(class_folder)
    prep = api.Preprocessing(size=16, crop=14)
    report = api.extract(
        model, source, out, preprocessing=prep, device="cpu", batch_size=batch_size
    )

    files = sorted(class_folder.glob("*/*.png"))
    _, expected = forward(model, [reference_input(f, size=16, crop=14) for f in files])
    table = pq.read_table(out)
    probs = read_vectors(table, "probs")
    np.testing.assert_allclose(probs, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert table.column("label").to_pylist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert table.column("path").to_pylist() == [str(f) for f in files]
    assert report.n_images == 9 and report.n_skipped == 0 and report.device == "cpu"
    assert report.class_names == CLASSES


def test_file_format_matches_the_reader_contract(model, class_folder, tmp_path):
    out = tmp_path / "probs.parquet"
    prep = api.Preprocessing(crop=16)
    api.extract(model, api.discover(class_folder), out, preprocessing=prep, device="cpu")
    schema = pq.read_schema(out)
    assert schema.names == ["label", "probs", "path"]
    assert schema.field("label").type == pa.int64()
    assert schema.field("probs").type == pa.list_(pa.float32(), 3)
    assert schema.field("path").type == pa.string()
    assert json.loads(schema.metadata[b"cnnbal.class_names"]) == CLASSES


def test_cli_torchscript_and_factory_give_the_same_file(
    model, class_folder, scripted_path, weights_path, tmp_path
):
    scripted_out, factory_out = tmp_path / "a.parquet", tmp_path / "b.parquet"
    result = run_cpu(scripted_path, class_folder, "-o", scripted_out, "--size", 16, "--crop", 16)
    assert result.exit_code == 0, result.output
    result = run_cpu(
        "_tiny_model:make_model", class_folder, "-o", factory_out,
        "--weights", weights_path, "--size", 16, "--crop", 16,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "extracted 9 images on cpu" in result.stderr

    files = sorted(class_folder.glob("*/*.png"))
    _, expected = forward(model, [reference_input(f, size=16, crop=16) for f in files])
    for out in (scripted_out, factory_out):
        np.testing.assert_allclose(
            read_vectors(pq.read_table(out), "probs"), expected, atol=1e-6, rtol=0
        )


def test_save_logits_and_their_softmax(model, class_folder, tmp_path):
    out = tmp_path / "probs.parquet"
    api.extract(
        model,
        api.discover(class_folder),
        out,
        preprocessing=api.Preprocessing(size=20, crop=20),
        device="cpu",
        save_logits=True,
    )
    table = pq.read_table(out)
    assert table.schema.names == ["label", "probs", "logits", "path"]
    assert table.schema.field("logits").type == pa.list_(pa.float32(), 3)
    files = sorted(class_folder.glob("*/*.png"))
    logits, probs = forward(model, [reference_input(f, size=20, crop=20) for f in files])
    np.testing.assert_allclose(read_vectors(table, "logits"), logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(read_vectors(table, "probs"), probs, atol=1e-6, rtol=0)


def test_flat_folder_has_no_label_column(model, flat_folder, tmp_path):
    out = tmp_path / "probs.parquet"
    report = api.extract(model, api.discover(flat_folder), out, device="cpu")
    table = pq.read_table(out)
    assert table.schema.names == ["probs", "path"]
    assert table.num_rows == 4 == report.n_images
    # no invented names: "0", "1", ... would clash with the real names stored in an H
    assert b"cnnbal.class_names" not in (table.schema.metadata or {})
    assert report.class_names is None
    files = sorted(flat_folder.glob("*.png"))
    _, expected = forward(model, [reference_input(f) for f in files])
    np.testing.assert_allclose(read_vectors(table, "probs"), expected, atol=1e-6, rtol=0)


def test_worker_processes_give_the_same_probs(model, class_folder, tmp_path):
    prep = api.Preprocessing(size=16, crop=16)
    source = api.discover(class_folder)
    outs = [tmp_path / "w0.parquet", tmp_path / "w1.parquet"]
    for workers, out in zip([0, 1], outs, strict=True):
        api.extract(
            model, source, out, preprocessing=prep, device="cpu", batch_size=4, workers=workers
        )
    first, second = (pq.read_table(out) for out in outs)
    assert first.equals(second)


def test_errors_from_worker_processes_stay_one_line(scripted_path, class_folder, tmp_path):
    broken = class_folder / "emu" / "zz_broken.png"
    broken.write_bytes(b"not a png")
    args = [scripted_path, class_folder, "--crop", 16, "--workers", 2, "--batch-size", 2]
    result = run_cpu(*args, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    assert str(broken) in error_line(result)
    result = run_cpu(*args, "-o", tmp_path / "o.parquet", "--skip-bad")
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 9


def test_grayscale_channel_choice(class_folder, tmp_path):
    from _tiny_model import make_gray_model

    gray = make_gray_model()
    out = tmp_path / "gray.parquet"
    prep = api.Preprocessing(size=16, crop=16, channels=1)
    api.extract(gray, api.discover(class_folder), out, preprocessing=prep, device="cpu")
    files = sorted(class_folder.glob("*/*.png"))
    mean, std = np.float32(IMAGENET_MEAN.mean()), np.float32(IMAGENET_STD.mean())
    inputs = [reference_input(f, 16, 16, mode="L", mean=mean, std=std) for f in files]
    _, expected = forward(gray, inputs)
    np.testing.assert_allclose(read_vectors(pq.read_table(out), "probs"), expected, atol=1e-6)


def test_bf16_autocast_on_cpu_still_gives_float32_distributions(model, class_folder, tmp_path):
    out = tmp_path / "bf16.parquet"
    prep = api.Preprocessing(size=16, crop=16)
    api.extract(
        model, api.discover(class_folder), out, preprocessing=prep, amp="bf16", device="cpu"
    )
    probs = read_vectors(pq.read_table(out), "probs")
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    files = sorted(class_folder.glob("*/*.png"))
    _, expected = forward(model, [reference_input(f, 16, 16) for f in files])
    np.testing.assert_allclose(probs, expected, atol=0.05)


# ---------------------------------------------------------------------------
# Arrays: npz (N, H, W, C) uint8 with labels, npy (N, C, H, W) float with --labels.


def test_npz_uint8_nhwc_with_labels(tmp_path):
    from _tiny_model import make_model  # the factory's own seeded weights (no --weights)

    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(5, 12, 12, 3), dtype=np.uint8)
    labels = np.array([0, 2, 1, 1, 0])
    data = tmp_path / "images.npz"
    np.savez(data, images=images, labels=labels)
    out = tmp_path / "probs.parquet"

    result = run_cpu("_tiny_model:make_model", data, "-o", out, "--batch-size", 2)
    assert result.exit_code == 0, result.output

    table = pq.read_table(out)
    assert table.column("label").to_pylist() == labels.tolist()
    assert table.column("path").to_pylist() == [f"{data}[{i}]" for i in range(5)]
    pixels = images.astype(np.float32) / np.float32(255)
    inputs = torch.from_numpy(((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2))
    _, expected = forward(make_model(), inputs)
    np.testing.assert_allclose(read_vectors(table, "probs"), expected, atol=1e-6, rtol=0)


def test_npy_float_nchw_with_labels_file(model, tmp_path):
    rng = np.random.default_rng(8)
    images = rng.random((6, 3, 10, 10), dtype=np.float32)
    data, labels_file = tmp_path / "images.npy", tmp_path / "labels.npy"
    np.save(data, images)
    np.save(labels_file, np.array([2, 1, 0, 0, 1, 2]))
    out = tmp_path / "probs.parquet"
    source = api.discover(data, labels_path=labels_file)
    assert isinstance(source.images, np.memmap)
    api.extract(model, source, out, batch_size=4, device="cpu")

    table = pq.read_table(out)
    assert table.column("label").to_pylist() == [2, 1, 0, 0, 1, 2]
    assert table.column("path")[3].as_py() == f"{data}[3]"
    mean, std = IMAGENET_MEAN.reshape(1, 3, 1, 1), IMAGENET_STD.reshape(1, 3, 1, 1)
    _, expected = forward(model, torch.from_numpy((images - mean) / std))
    np.testing.assert_allclose(read_vectors(table, "probs"), expected, atol=1e-6, rtol=0)


def test_npz_without_labels_and_crop(model, tmp_path):
    images = np.random.default_rng(9).integers(0, 256, size=(3, 14, 18, 3), dtype=np.uint8)
    data = tmp_path / "unlabelled.npz"
    np.savez(data, images=images)
    out = tmp_path / "probs.parquet"
    prep = api.Preprocessing(crop=10)
    api.extract(model, api.discover(data), out, preprocessing=prep, device="cpu")
    table = pq.read_table(out)
    assert table.schema.names == ["probs", "path"]
    cropped = images[:, 2:12, 4:14].astype(np.float32) / np.float32(255)
    inputs = torch.from_numpy(((cropped - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2))
    _, expected = forward(model, inputs)
    np.testing.assert_allclose(read_vectors(table, "probs"), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("images", "channels"),
    [
        (np.full((3, 9, 12, 1), 200, dtype=np.uint8), 3),  # gray uint8 -> RGB
        (np.full((3, 9, 12, 3), 200, dtype=np.uint8), 1),  # RGB uint8 -> gray
        (np.full((3, 1, 9, 12), 200 / 255, dtype=np.float32), 3),  # gray float -> RGB
        (np.full((3, 3, 9, 12), 200 / 255, dtype=np.float32), 1),  # RGB float -> gray
    ],
)
def test_array_channel_conversion_and_resize(tmp_path, images, channels):
    """Constant images stay constant through conversion and resizing (to 6 x 8)."""
    from _tiny_model import make_model

    model = make_model(in_channels=channels)
    data = tmp_path / "images.npy"
    np.save(data, images)
    out = tmp_path / "probs.parquet"
    prep = api.Preprocessing(size=6, channels=channels, mean=(0.5,), std=(0.25,))
    api.extract(model, api.discover(data), out, preprocessing=prep, device="cpu")
    expected_input = torch.full((3, channels, 6, 8), (200 / 255 - 0.5) / 0.25)
    _, expected = forward(model, expected_input)
    np.testing.assert_allclose(read_vectors(pq.read_table(out), "probs"), expected, atol=1e-5)


# ---------------------------------------------------------------------------
# Atomic output: a failing run leaves neither the output nor a temporary file.


def test_failing_run_leaves_no_file_and_keeps_the_old_one(scripted_path, class_folder, tmp_path):
    (class_folder / "emu" / "zz_broken.png").write_bytes(b"this is not a png")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "probs.parquet"
    result = run_cpu(scripted_path, class_folder, "-o", out, "--batch-size", 2, "--crop", 16)
    assert result.exit_code == 2
    assert list(out_dir.iterdir()) == []

    out.write_bytes(b"previous contents")
    result = run_cpu(scripted_path, class_folder, "-o", out, "--batch-size", 2, "--crop", 16)
    assert result.exit_code == 2
    assert out.read_bytes() == b"previous contents"
    assert list(out_dir.iterdir()) == [out]


def test_interrupt_removes_the_temporary_file(model, class_folder, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def interrupt(n_done, n_total):
        if n_done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.extract(
            model,
            api.discover(class_folder),
            out_dir / "probs.parquet",
            preprocessing=api.Preprocessing(crop=16),
            batch_size=2,
            device="cpu",
            progress=interrupt,
        )
    assert list(out_dir.iterdir()) == []


def test_cli_interrupt_exits_130(monkeypatch, scripted_path, flat_folder, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "extract", interrupted)
    result = run_cpu(scripted_path, flat_folder, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted"


def test_never_overwrites_the_input(model, class_folder, tmp_path):
    data = tmp_path / "images.npz"
    np.savez(data, images=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    image = class_folder / "dog" / "img1.png"
    (tmp_path / "x").mkdir()
    for source, out in [
        (data, data),
        (class_folder, image),
        (class_folder, tmp_path / "x/../data/dog/img1.png"),
    ]:
        before = out.read_bytes()
        with pytest.raises(CnnbalError, match="is an input file"):
            api.extract(model, api.discover(source), out, device="cpu")
        assert out.read_bytes() == before


def test_progress_callback_counts_every_image(model, class_folder, tmp_path):
    calls = []
    api.extract(
        model,
        api.discover(class_folder),
        tmp_path / "p.parquet",
        preprocessing=api.Preprocessing(crop=16),
        batch_size=4,
        device="cpu",
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(4, 9), (8, 9), (9, 9)]


# ---------------------------------------------------------------------------
# Errors: one line on stderr, exit code 2, the file named.


def test_model_file_that_does_not_load(class_folder, tmp_path):
    bad_model = tmp_path / "garbage.pt"
    bad_model.write_bytes(b"definitely not a zip archive")
    result = run_cpu(bad_model, class_folder, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    assert str(bad_model) in error_line(result)


def test_output_width_differs_from_class_folders(scripted_path, class_folder, tmp_path):
    write_png(class_folder / "fox" / "a.png", 20, 20, seed=1)
    result = run_cpu(scripted_path, class_folder, "-o", tmp_path / "o.parquet", "--crop", 16)
    assert result.exit_code == 2
    line = error_line(result)
    assert str(class_folder) in line and "4 class folders" in line and "3 classes" in line


def test_unreadable_image_is_named(scripted_path, class_folder, tmp_path):
    broken = class_folder / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG but truncated")
    result = run_cpu(scripted_path, class_folder, "-o", tmp_path / "o.parquet", "--crop", 16)
    assert result.exit_code == 2
    assert str(broken) in error_line(result)
    assert not (tmp_path / "o.parquet").exists()


def test_skip_bad_skips_and_counts(scripted_path, class_folder, tmp_path):
    broken = class_folder / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG but truncated")
    out = tmp_path / "o.parquet"
    result = run_cpu(scripted_path, class_folder, "-o", out, "--crop", 16, "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "extracted 9 images, skipped 1 unreadable" in result.stderr
    assert f"skipped: {broken}" in result.stderr
    table = pq.read_table(out)
    assert table.num_rows == 9
    assert str(broken) not in table.column("path").to_pylist()


def test_empty_folder(scripted_path, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cpu(scripted_path, empty, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    assert str(empty) in error_line(result)


def test_empty_class_folder(scripted_path, class_folder, tmp_path):
    (class_folder / "zebra").mkdir()
    result = run_cpu(scripted_path, class_folder, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    assert str(class_folder / "zebra") in error_line(result)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_such_module_xyz:make_model", "cannot import no_such_module_xyz"),
        ("_tiny_model:no_such_factory", "has no callable no_such_factory"),
        ("_tiny_model:not_a_model", "not a torch.nn.Module"),
    ],
)
def test_factory_that_does_not_import(class_folder, tmp_path, spec, expected):
    result = run_cpu(spec, class_folder, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    line = error_line(result)
    assert spec in line and expected in line


def test_weights_that_do_not_fit(class_folder, tmp_path):
    from _tiny_model import TinyNet

    wrong = tmp_path / "wrong.pt"
    torch.save(TinyNet(n_classes=5).state_dict(), wrong)
    result = run_cpu("_tiny_model:make_model", class_folder, "-o", tmp_path / "o.parquet",
                     "--weights", wrong)  # fmt: skip
    assert result.exit_code == 2
    assert str(wrong) in error_line(result)


def test_weights_are_not_unpickled_as_arbitrary_objects(class_folder, tmp_path):
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}, "obj": Path("x")}, pickled)
    with pytest.raises(CnnbalError, match="weights_only"):
        api.load_model("_tiny_model:make_model", pickled)


def test_images_of_different_sizes_need_resizing(scripted_path, class_folder, tmp_path):
    result = run_cpu(scripted_path, class_folder, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    assert "--size" in error_line(result)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--mean", "0.5,0.5"], "--mean"),
        (["--std", "0,1,1"], "--std"),
        (["--channels", "2"], "--channels"),
        # refused whatever GPUs the machine has (cuda:N against the count: test_extract_devices)
        (["--device", "cpu:1"], "--device"),
        (["--device", "gpu"], "--device"),
        (["--device", "cuda:-1"], "--device"),
        (["--amp", "fp16", "--device", "cpu"], "--amp"),
    ],
)
def test_bad_flags(scripted_path, flat_folder, tmp_path, args, expected):
    result = run_cli(scripted_path, flat_folder, "-o", tmp_path / "o.parquet", *args)
    assert result.exit_code == 2
    assert expected in error_line(result)


def test_bad_arrays(scripted_path, tmp_path):
    cases = {
        "int.npy": np.zeros((2, 8, 8, 3), dtype=np.int32),
        "three_d.npy": np.zeros((2, 8, 8), dtype=np.uint8),
    }
    for name, array in cases.items():
        np.save(tmp_path / name, array)
        result = run_cpu(scripted_path, tmp_path / name, "-o", tmp_path / "o.parquet")
        assert result.exit_code == 2
        assert str(tmp_path / name) in error_line(result)
    np.savez(tmp_path / "nokey.npz", pixels=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    result = run_cpu(scripted_path, tmp_path / "nokey.npz", "-o", tmp_path / "o.parquet")
    assert "'images'" in error_line(result)
    np.save(tmp_path / "ok.npy", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    np.save(tmp_path / "labels.npy", np.array([0, 1, 2]))
    result = run_cpu(scripted_path, tmp_path / "ok.npy", "-o", tmp_path / "o.parquet",
                     "--labels", tmp_path / "labels.npy")  # fmt: skip
    assert "3 labels for 2 images" in error_line(result)


def test_missing_torch_says_how_to_install(monkeypatch, flat_folder, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    result = run_cli("model.pt", flat_folder, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    assert "pip install 'cnnbal[extract]'" in error_line(result)


# ---------------------------------------------------------------------------
# torch stays optional; the command also works through a real process.


def test_importing_cnnbal_does_not_import_torch():
    modules = ["cnnbal", "cnnbal.extract", "cnnbal.cli_extract"]
    if (REPO_ROOT / "cnnbal" / "cli.py").exists():
        modules.append("cnnbal.cli")
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
    code += "assert 'torch' not in sys.modules, 'torch was imported'\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_command_in_a_real_process(scripted_path, class_folder, tmp_path):
    out = tmp_path / "probs.parquet"
    code = (
        "import typer; from cnnbal.cli_extract import extract_command; typer.run(extract_command)"
    )
    args = [str(scripted_path), str(class_folder), "-o", str(out), "--size", "16", "--crop", "16"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    # device "auto": CUDA on a GPU machine; the expectation reads the device from the output
    summary = json.loads(done.stdout)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1  # a summary, no progress bar in a pipe
    precision = summary["precision"]
    assert lines[0].startswith(f"extracted 9 images on {summary['device']} ({precision}) in ")
    assert "images/s" in lines[0]
    table = pq.read_table(out)
    assert table.num_rows == 9 == summary["rows"]
    np.testing.assert_allclose(read_vectors(table, "probs").sum(axis=1), 1.0, atol=1e-5)


def test_classes_file_names_a_flat_folder(scripted_path, flat_folder, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("ant\nbee\ncow\n")
    out = tmp_path / "named.parquet"
    result = run_cpu(scripted_path, flat_folder, "-o", out, "--classes", classes)
    assert result.exit_code == 0, result.output
    meta = pq.read_schema(out).metadata
    assert json.loads(meta[b"cnnbal.class_names"]) == ["ant", "bee", "cow"]
    classes.write_text("ant\nbee\n")
    bad = run_cpu(scripted_path, flat_folder, "-o", tmp_path / "x.parquet", "--classes", classes)
    assert bad.exit_code == 2
    assert "2 class names but the model outputs 3" in bad.stderr
