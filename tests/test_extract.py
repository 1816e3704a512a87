"""cnnbal extract: probabilities equal a direct forward pass; layouts, errors, atomic output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cnnbal import extract as api  # noqa: E402
from cnnbal.cli_extract import extract_command  # noqa: E402
from cnnbal.errors import CnnbalError  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
CLASSES = ["cat", "dog", "emu"]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Width x height of the generated images: portrait, landscape and square.
SIZES = [(20, 26), (27, 19), (22, 22)]

# Recent torch deprecates TorchScript, but it is the archive format extract reads.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)

app = typer.Typer()
app.command("extract")(extract_command)


@app.command("other")
def _other() -> None:
    """A second command, so that the app dispatches on the command name."""


runner = CliRunner()


# ---------------------------------------------------------------------------
# Fixtures: a seeded tiny CNN saved both ways, and generated images.


@pytest.fixture(autouse=True)
def _factory_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS_DIR))


@pytest.fixture
def model():
    """A tiny CNN with weights unlike the factory's default (so --weights must be loaded)."""
    from _tiny_model import TinyNet

    torch.manual_seed(1)
    return TinyNet().eval()


@pytest.fixture
def scripted_path(model, tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(model), path)
    return path


@pytest.fixture
def weights_path(model, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    return path


def _write_png(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def class_folder(tmp_path):
    """data/cat, data/dog, data/emu with three PNGs of different sizes each."""
    root = tmp_path / "data"
    for class_index, name in enumerate(CLASSES):
        for image_index, (width, height) in enumerate(SIZES):
            seed = 10 * class_index + image_index
            _write_png(root / name / f"img{image_index}.png", width, height, seed)
    return root


@pytest.fixture
def flat_folder(tmp_path):
    root = tmp_path / "flat"
    for image_index in range(4):
        _write_png(root / f"x{image_index}.png", 16, 16, seed=100 + image_index)
    (root / "notes.txt").write_text("not an image, ignored")
    return root


# ---------------------------------------------------------------------------
# An independent formulation of the preprocessing (Pillow + numpy only).


def reference_input(path, size=None, crop=None, mode="RGB", mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Decode, resize the shorter side to `size`, center-crop, scale, normalise: (C, H, W)."""
    image = Image.open(path).convert(mode)
    if size is not None:
        width, height = image.size
        if width <= height:
            new_size = (size, int(size * height / width))
        else:
            new_size = (int(size * width / height), size)
        image = image.resize(new_size, Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if crop is not None:
        height, width = pixels.shape[:2]
        top, left = round((height - crop) / 2), round((width - crop) / 2)
        pixels = pixels[top : top + crop, left : left + crop]
    pixels = (pixels - mean) / std
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def forward(model, inputs):
    with torch.no_grad():
        logits = model(torch.stack(list(inputs))).float()
    return logits.numpy(), torch.softmax(logits, dim=1).numpy()


def read_vectors(table, column):
    values = table.column(column).combine_chunks()
    width = values.type.list_size
    return values.flatten().to_numpy().reshape(-1, width)


def run_cli(*args):
    return runner.invoke(app, ["extract", *map(str, args)])


def error_line(result):
    """The CLI's whole stderr, which must be one line starting with 'error: '."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


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
    result = run_cli(scripted_path, class_folder, "-o", scripted_out, "--size", 16, "--crop", 16)
    assert result.exit_code == 0, result.output
    result = run_cli(
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
    result = run_cli(*args, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    assert str(broken) in error_line(result)
    result = run_cli(*args, "-o", tmp_path / "o.parquet", "--skip-bad")
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
    api.extract(model, api.discover(class_folder), out, preprocessing=prep, amp="bf16")
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

    result = run_cli("_tiny_model:make_model", data, "-o", out, "--batch-size", 2)
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
    api.extract(model, source, out, batch_size=4)

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
    api.extract(model, api.discover(data), out, preprocessing=api.Preprocessing(crop=10))
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
    api.extract(model, api.discover(data), out, preprocessing=prep)
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
    result = run_cli(scripted_path, class_folder, "-o", out, "--batch-size", 2, "--crop", 16)
    assert result.exit_code == 2
    assert list(out_dir.iterdir()) == []

    out.write_bytes(b"previous contents")
    result = run_cli(scripted_path, class_folder, "-o", out, "--batch-size", 2, "--crop", 16)
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
            progress=interrupt,
        )
    assert list(out_dir.iterdir()) == []


def test_cli_interrupt_exits_130(monkeypatch, scripted_path, flat_folder, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "extract", interrupted)
    result = run_cli(scripted_path, flat_folder, "-o", tmp_path / "o.parquet")
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
            api.extract(model, api.discover(source), out)
        assert out.read_bytes() == before


def test_progress_callback_counts_every_image(model, class_folder, tmp_path):
    calls = []
    api.extract(
        model,
        api.discover(class_folder),
        tmp_path / "p.parquet",
        preprocessing=api.Preprocessing(crop=16),
        batch_size=4,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(4, 9), (8, 9), (9, 9)]


# ---------------------------------------------------------------------------
# Errors: one line on stderr, exit code 2, the file named.


def test_model_file_that_does_not_load(class_folder, tmp_path):
    bad_model = tmp_path / "garbage.pt"
    bad_model.write_bytes(b"definitely not a zip archive")
    result = run_cli(bad_model, class_folder, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    assert str(bad_model) in error_line(result)


def test_output_width_differs_from_class_folders(scripted_path, class_folder, tmp_path):
    _write_png(class_folder / "fox" / "a.png", 20, 20, seed=1)
    result = run_cli(scripted_path, class_folder, "-o", tmp_path / "o.parquet", "--crop", 16)
    assert result.exit_code == 2
    line = error_line(result)
    assert str(class_folder) in line and "4 class folders" in line and "3 classes" in line


def test_unreadable_image_is_named(scripted_path, class_folder, tmp_path):
    broken = class_folder / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG but truncated")
    result = run_cli(scripted_path, class_folder, "-o", tmp_path / "o.parquet", "--crop", 16)
    assert result.exit_code == 2
    assert str(broken) in error_line(result)
    assert not (tmp_path / "o.parquet").exists()


def test_skip_bad_skips_and_counts(scripted_path, class_folder, tmp_path):
    broken = class_folder / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG but truncated")
    out = tmp_path / "o.parquet"
    result = run_cli(scripted_path, class_folder, "-o", out, "--crop", 16, "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "extracted 9 images, skipped 1 unreadable" in result.stderr
    assert f"skipped: {broken}" in result.stderr
    table = pq.read_table(out)
    assert table.num_rows == 9
    assert str(broken) not in table.column("path").to_pylist()


def test_empty_folder(scripted_path, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(scripted_path, empty, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    assert str(empty) in error_line(result)


def test_empty_class_folder(scripted_path, class_folder, tmp_path):
    (class_folder / "zebra").mkdir()
    result = run_cli(scripted_path, class_folder, "-o", tmp_path / "o.parquet")
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
    result = run_cli(spec, class_folder, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    line = error_line(result)
    assert spec in line and expected in line


def test_weights_that_do_not_fit(class_folder, tmp_path):
    from _tiny_model import TinyNet

    wrong = tmp_path / "wrong.pt"
    torch.save(TinyNet(n_classes=5).state_dict(), wrong)
    result = run_cli("_tiny_model:make_model", class_folder, "-o", tmp_path / "o.parquet",
                     "--weights", wrong)  # fmt: skip
    assert result.exit_code == 2
    assert str(wrong) in error_line(result)


def test_weights_are_not_unpickled_as_arbitrary_objects(class_folder, tmp_path):
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}, "obj": Path("x")}, pickled)
    with pytest.raises(CnnbalError, match="weights_only"):
        api.load_model("_tiny_model:make_model", pickled)


def test_images_of_different_sizes_need_resizing(scripted_path, class_folder, tmp_path):
    result = run_cli(scripted_path, class_folder, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2
    assert "--size" in error_line(result)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--mean", "0.5,0.5"], "--mean"),
        (["--std", "0,1,1"], "--std"),
        (["--channels", "2"], "--channels"),
        (["--device", "cuda:7"], "--device"),
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
        result = run_cli(scripted_path, tmp_path / name, "-o", tmp_path / "o.parquet")
        assert result.exit_code == 2
        assert str(tmp_path / name) in error_line(result)
    np.savez(tmp_path / "nokey.npz", pixels=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    result = run_cli(scripted_path, tmp_path / "nokey.npz", "-o", tmp_path / "o.parquet")
    assert "'images'" in error_line(result)
    np.save(tmp_path / "ok.npy", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    np.save(tmp_path / "labels.npy", np.array([0, 1, 2]))
    result = run_cli(scripted_path, tmp_path / "ok.npy", "-o", tmp_path / "o.parquet",
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
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1  # a summary, no progress bar in a pipe
    assert lines[0].startswith("extracted 9 images on cpu in ")
    assert "images/s" in lines[0]
    assert pq.read_table(out).num_rows == 9


def test_classes_file_names_a_flat_folder(scripted_path, flat_folder, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("ant\nbee\ncow\n")
    out = tmp_path / "named.parquet"
    result = run_cli(scripted_path, flat_folder, "-o", out, "--classes", classes)
    assert result.exit_code == 0, result.output
    meta = pq.read_schema(out).metadata
    assert json.loads(meta[b"cnnbal.class_names"]) == ["ant", "bee", "cow"]
    classes.write_text("ant\nbee\n")
    bad = run_cli(scripted_path, flat_folder, "-o", tmp_path / "x.parquet", "--classes", classes)
    assert bad.exit_code == 2
    assert "2 class names but the model outputs 3" in bad.stderr
