"""A tiny seeded CNN for the extract tests, importable as ``_tiny_model:make_model``."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv -> relu -> global average pool -> linear: (B, C, H, W) -> (B, n_classes) logits."""

    def __init__(self, in_channels: int = 3, n_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(images)).mean(dim=(2, 3))
        return self.head(features) * 3.0  # spread the logits so the softmax is not flat


def make_model(in_channels: int = 3, n_classes: int = 3) -> TinyNet:
    """The factory ``cnnbal extract`` calls (no arguments); seeded, so always the same weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = TinyNet(in_channels, n_classes)
    torch.random.set_rng_state(generator_state)
    return model.eval()


def make_gray_model() -> TinyNet:
    return make_model(in_channels=1)


def not_a_model() -> str:
    return "not a module"


class BrightnessNet(nn.Module):
    """Logits proportional to an image's mean brightness: large for bright images.

    A bright image's logits pass 65504, the largest float16: finite in float32,
    inf under fp16 autocast (the Linear runs in float16), as an fp16 overflow on CUDA.
    """

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[4e4], [3e4], [1e4]]))
            self.head.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(images.mean(dim=(1, 2, 3)))[:, None])


def make_overflow_model() -> BrightnessNet:
    return BrightnessNet().eval()


class PoisonedNet(TinyNet):
    """TinyNet whose logits for batch row ``row`` are ``value`` (inf or NaN)."""

    def __init__(self, row: int, value: float):
        super().__init__()
        self.row, self.value = row, value

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = super().forward(images)
        if len(logits) > self.row:
            logits[self.row, 0] = self.value
        return logits


class RaisingNet(TinyNet):
    """TinyNet whose forward raises ``error`` (a device error imitated on the CPU)."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise self.error


def make_oom_model() -> RaisingNet:
    """A factory whose forward raises torch.OutOfMemoryError, as CUDA does on a too-large batch."""
    message = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total capacity)"
    return RaisingNet(torch.OutOfMemoryError(message)).eval()


def make_flat_model() -> nn.Module:
    """A model for 16 x 16 RGB inputs only: other sizes fail with a shape mismatch."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3)).eval()


def raising_factory() -> nn.Module:
    raise ValueError("checkpoint directory not configured")


def make_nan_model() -> PoisonedNet:
    """A factory whose model returns NaN for the second image of every batch (in float32)."""
    return PoisonedNet(row=1, value=float("nan")).eval()
