"""Helpers of the extract tests: generated images, a reference forward pass, a fake CUDA.

GPU safety: every test that compares with a CPU forward pass pins
``device="cpu"`` (``--device cpu``). Setting ``CNNBAL_TEST_FAKE_CUDA=1`` makes
torch report 8 CUDA devices that cannot be used: a test that left the device
on "auto" (and would run on CUDA on a GPU machine) then fails, so

    CNNBAL_TEST_FAKE_CUDA=1 python -m pytest tests/extract

shows that the suite does not depend on the machine having no GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cnnbal.cli_extract import extract_command  # noqa: E402

# tests/, where _tiny_model.py (the factories the command imports) lives
TESTS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = TESTS_DIR.parent
CLASSES = ["cat", "dog", "emu"]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Width x height of the generated images: portrait, landscape and square.
SIZES = [(20, 26), (27, 19), (22, 22)]

# Recent torch deprecates TorchScript, but it is the archive format extract reads.
TORCHSCRIPT_WARNING = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)

app = typer.Typer()
app.command("extract")(extract_command)


@app.command("other")
def _other() -> None:
    """A second command, so that the app dispatches on the command name."""


runner = CliRunner()


def install_fake_cuda(monkeypatch, n_devices=1, capabilities=None, current=0):
    """Make torch report ``n_devices`` CUDA devices (that cannot run anything).

    ``capabilities`` maps a device index to its compute capability (default 9.0).
    """
    capabilities = capabilities or {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_devices)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"Fake GPU {index}")
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda index=None: capabilities.get(index, (9, 0))
    )


def write_png(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


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
    """A direct CPU forward pass: logits and softmax probabilities as numpy arrays."""
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


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (links not followed) and its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }
