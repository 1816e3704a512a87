"""Preprocessing: how a decoded image becomes model input (steps 1-4 of :mod:`cnnbal.extract`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnbal._install import install_hint
from cnnbal.errors import CnnbalError

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: How to install torch and Pillow (the editable form from a source checkout).
INSTALL_HINT = install_hint("extract")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images become model input (see :mod:`cnnbal.extract` for the exact steps).

    Parameters
    ----------
    size : int or None, default None
        Resize so that the shorter side is ``size`` pixels; None keeps the size.
    crop : int or None, default None
        Cut the central ``crop`` x ``crop`` square; None keeps the whole image.
    mean, std : sequence of float or None, default None
        Per-channel normalisation, one value per channel or a single value for
        all channels. None means the ImageNet values (their average for
        ``channels=1``).
    channels : {1, 3}, default 3
        3 converts every image to RGB, 1 to grayscale.
    """

    size: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: int = 3

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise CnnbalError(f"--channels: expected 1 or 3, got {self.channels}")
        for flag, value in (("--size", self.size), ("--crop", self.crop)):
            if value is not None and value < 1:
                raise CnnbalError(f"{flag}: expected a positive number of pixels, got {value}")
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if values is not None and len(values) not in (1, self.channels):
                raise CnnbalError(
                    f"{flag}: expected 1 or {self.channels} values for {self.channels} "
                    f"channel(s), got {len(values)}"
                )
        if self.std is not None and any(not value > 0 for value in self.std):
            raise CnnbalError(f"--std: expected positive values, got {list(self.std)}")

    @property
    def channel_mean(self) -> tuple[float, ...]:
        """The per-channel mean, ``channels`` values."""
        return _per_channel(self.mean, IMAGENET_MEAN, self.channels)

    @property
    def channel_std(self) -> tuple[float, ...]:
        """The per-channel standard deviation, ``channels`` values."""
        return _per_channel(self.std, IMAGENET_STD, self.channels)


def require_torch() -> None:
    """Raise :class:`CnnbalError` with the install command when torch or Pillow is missing."""
    try:
        import PIL  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        raise CnnbalError(
            f"extract needs torch and Pillow ({error.name or error} is missing): {INSTALL_HINT}"
        ) from None


def load_image(
    path: str | os.PathLike, preprocessing: Preprocessing = Preprocessing()
) -> np.ndarray:
    """Decode one image file and apply steps 1-3 of the preprocessing.

    Parameters
    ----------
    path : str or path
        An image file Pillow can read.
    preprocessing : Preprocessing

    Returns
    -------
    image : ndarray of shape (H, W, channels) uint8

    Raises
    ------
    CnnbalError
        The file cannot be decoded, or it is smaller than ``crop``.
    """
    require_torch()
    try:
        return _load_image(Path(path), preprocessing)
    except BadImage as error:
        raise CnnbalError(str(error)) from None


def preprocess(images, preprocessing: Preprocessing = Preprocessing()) -> torch.Tensor:
    """Scale and normalise decoded images into a model input batch (step 4).

    Parameters
    ----------
    images : ndarray or tensor of shape (B, H, W, C) uint8, or (B, C, H, W) float in [0, 1]
        Output of :func:`load_image`, stacked; a float batch skips the
        division by 255. C must equal ``preprocessing.channels``.
    preprocessing : Preprocessing

    Returns
    -------
    batch : tensor of shape (B, C, H, W) float32, contiguous, on the input's device
        ``(images / 255 - mean) / std`` per channel.
    """
    require_torch()
    import torch

    tensor = torch.as_tensor(images)
    mean, std = normalisation_tensors(preprocessing, tensor.device)
    return normalise(tensor, mean, std)


# ---------------------------------------------------------------------------
# Helpers shared by the data loader and the run loop.


class BadImage(Exception):
    """An image file that cannot be decoded (skippable with skip_bad)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when empty)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def normalisation_tensors(preprocessing: Preprocessing, device):
    """Mean and std as (1, C, 1, 1) float32 tensors on ``device``."""
    import torch

    shape = (1, preprocessing.channels, 1, 1)
    mean = torch.tensor(preprocessing.channel_mean, dtype=torch.float32, device=device)
    std = torch.tensor(preprocessing.channel_std, dtype=torch.float32, device=device)
    return mean.view(shape), std.view(shape)


def normalise(images, mean, std):
    """(B, H, W, C) uint8 or (B, C, H, W) float -> normalised (B, C, H, W) float32, contiguous."""
    import torch

    if images.dtype == torch.uint8:
        batch = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    else:
        batch = images.to(torch.float32, copy=True)
    return batch.sub_(mean).div_(std).contiguous()


def _load_image(path: Path, preprocessing: Preprocessing) -> np.ndarray:
    """Decode, convert, resize and crop: (H, W, C) uint8. Raises BadImage or CnnbalError."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB" if preprocessing.channels == 3 else "L")
    except Exception as error:  # Pillow raises many types for a broken file
        raise BadImage(f"{path}: cannot read image ({first_line(error)})") from None
    return resize_crop(image, preprocessing, path)


def resize_crop(image, preprocessing: Preprocessing, name) -> np.ndarray:
    """Steps 2-3 on a Pillow image: (H, W, C) uint8."""
    from PIL import Image

    if preprocessing.size is not None:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = preprocessing.size, int(preprocessing.size * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        if new_size != image.size:
            image = image.resize(new_size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return center_crop(pixels, preprocessing.crop, name, channels_last=True)


def center_crop(pixels, crop: int | None, name, *, channels_last: bool):
    """The central ``crop`` square of (H, W, C) or (..., H, W) pixels (a view)."""
    if crop is None:
        return pixels
    height, width = pixels.shape[:2] if channels_last else pixels.shape[-2:]
    if height < crop or width < crop:
        raise CnnbalError(
            f"{name}: image is {width}x{height} after resizing, smaller than --crop {crop}"
        )
    top = round((height - crop) / 2.0)
    left = round((width - crop) / 2.0)
    if channels_last:
        return pixels[top : top + crop, left : left + crop]
    return pixels[..., top : top + crop, left : left + crop]


def _per_channel(values, default: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if values is None:
        values = default if channels == 3 else (sum(default) / len(default),)
    values = tuple(float(value) for value in values)
    return values * channels if len(values) == 1 else values
