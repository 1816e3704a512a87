"""Fixtures of the extract tests: a seeded tiny CNN saved both ways, generated images.

Also, with ``CNNBAL_TEST_FAKE_CUDA=1`` in the environment, a fake CUDA for every
test (see :mod:`tests.extract.helpers`).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL.Image")

from tests.extract.helpers import CLASSES, SIZES, TESTS_DIR, install_fake_cuda, write_png  # noqa: E402

# ---------------------------------------------------------------------------
# Fixtures: a seeded tiny CNN saved both ways, generated images, a fake CUDA.


@pytest.fixture(autouse=True)
def _factory_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS_DIR))


@pytest.fixture(autouse=True)
def _fake_cuda_from_env(monkeypatch):
    if os.environ.get("CNNBAL_TEST_FAKE_CUDA"):
        install_fake_cuda(monkeypatch, n_devices=8)


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


@pytest.fixture
def class_folder(tmp_path):
    """data/cat, data/dog, data/emu with three PNGs of different sizes each."""
    root = tmp_path / "data"
    for class_index, name in enumerate(CLASSES):
        for image_index, (width, height) in enumerate(SIZES):
            seed = 10 * class_index + image_index
            write_png(root / name / f"img{image_index}.png", width, height, seed)
    return root


@pytest.fixture
def flat_folder(tmp_path):
    root = tmp_path / "flat"
    for image_index in range(4):
        write_png(root / f"x{image_index}.png", 16, 16, seed=100 + image_index)
    (root / "notes.txt").write_text("not an image, ignored")
    return root
