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
