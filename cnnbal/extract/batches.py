"""Batches: the data loader that decodes images (in workers) into host batches.

Every batch leaves here contiguous: on CUDA the loader pins each batch into
page-locked memory, and pinning copies into a tensor of the same strides, which
fails for a stride-0 view ("more than one element of the written-to tensor
refers to a single memory location").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnbal.errors import CnnbalError
from cnnbal.extract.preprocessing import (
    BadImage,
    Preprocessing,
    _load_image,
    center_crop,
    resize_crop,
)
from cnnbal.extract.sources import ImageSource, _array_layout


class _FileBatches:
    """Map-style dataset whose items are whole batches: one worker call per batch.

    Item ``indices`` -> ``(positions, images, bad, fatal)``: the positions of the
    images that were read (int64 tensor), their pixels ((B, H, W, C) uint8
    tensor), ``[(position, message)]`` for undecodable files, and a message
    when the batch cannot be built at all (None otherwise). Errors travel as
    values because a data loader worker would re-raise them with a traceback.
    """

    def __init__(self, files: tuple[Path, ...], preprocessing: Preprocessing):
        self.files = files
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, indices):
        import torch

        positions: list[int] = []
        pixels: list[np.ndarray] = []
        bad: list[tuple[int, str]] = []
        for index in indices:
            try:
                image = _load_image(self.files[index], self.preprocessing)
            except BadImage as error:
                bad.append((index, str(error)))
                continue
            except CnnbalError as error:
                return _empty_batch(), _empty_images(), bad, str(error)
            if pixels and image.shape != pixels[0].shape:
                return (
                    _empty_batch(),
                    _empty_images(),
                    bad,
                    _size_mismatch(
                        self.files[index], image.shape, self.files[positions[0]], pixels[0].shape
                    ),
                )
            positions.append(index)
            pixels.append(image)
        images = torch.from_numpy(np.stack(pixels)) if pixels else _empty_images()
        return torch.tensor(positions, dtype=torch.int64), images, bad, None


class _ArrayBatches:
    """Batches of an in-memory or memory-mapped image array (same items as _FileBatches)."""

    def __init__(self, source: ImageSource, preprocessing: Preprocessing):
        self.images = source.images
        self.layout = _array_layout(self.images)
        self.path = source.path
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices):
        import torch

        start, stop = indices[0], indices[-1] + 1  # the sampler gives consecutive runs
        chunk = np.array(self.images[start:stop])  # a writable copy, also of a memmap
        positions = torch.arange(start, stop, dtype=torch.int64)
        try:
            if self.layout == "nhwc":
                images = torch.from_numpy(self._uint8_batch(chunk, start))
            else:
                images = self._float_batch(torch.from_numpy(chunk).to(torch.float32), start)
        except CnnbalError as error:
            return _empty_batch(), _empty_images(), [], str(error)
        # the crop is a view too: every batch leaves contiguous (see the module docstring)
        return positions, images.contiguous(), [], None

    def _uint8_batch(self, chunk: np.ndarray, start: int) -> np.ndarray:
        prep = self.preprocessing
        if prep.size is None and chunk.shape[3] == prep.channels:
            return np.stack(
                [
                    center_crop(
                        image, prep.crop, f"{self.path}[{start + offset}]", channels_last=True
                    )
                    for offset, image in enumerate(chunk)
                ]
            )
        from PIL import Image

        mode = "RGB" if prep.channels == 3 else "L"
        return np.stack(
            [
                resize_crop(
                    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).convert(mode),
                    prep,
                    f"{self.path}[{start + offset}]",
                )
                for offset, image in enumerate(chunk)
            ]
        )

    def _float_batch(self, chunk, start: int):
        import torch

        prep = self.preprocessing
        if chunk.shape[1] != prep.channels:
            if prep.channels == 3:
                # expand is a stride-0 view: copy, or pinning the batch fails on CUDA
                chunk = chunk.expand(-1, 3, -1, -1).contiguous()
            else:  # Pillow's "L" weights (ITU-R 601-2)
                weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                chunk = (chunk * weights).sum(dim=1, keepdim=True)
        if prep.size is not None:
            height, width = chunk.shape[-2:]
            short, long = min(width, height), max(width, height)
            new_long = int(prep.size * long / short)
            new_hw = (prep.size, new_long) if height <= width else (new_long, prep.size)
            if new_hw != (height, width):
                chunk = torch.nn.functional.interpolate(
                    chunk, size=new_hw, mode="bilinear", antialias=True, align_corners=False
                )
        return center_crop(chunk, prep.crop, f"{self.path}[{start}]", channels_last=False)


def _empty_batch():
    import torch

    return torch.zeros(0, dtype=torch.int64)


def _empty_images():
    import torch

    return torch.zeros((0, 1, 1, 1), dtype=torch.uint8)


def _no_collate(batch):
    return batch


def _size_mismatch(path, shape, first_path, first_shape) -> str:
    return (
        f"{path}: image is {shape[1]}x{shape[0]} but {first_path} is "
        f"{first_shape[1]}x{first_shape[0]}; pass --size and --crop to give all images one size"
    )


def make_loader(source: ImageSource, preprocessing: Preprocessing, batch_size, workers, pin_memory):
    """A DataLoader whose items are whole batches ``(positions, images, bad, fatal)``.

    Arrays are always read in this process (no decoding to spread; workers
    would copy the array). ``pin_memory`` is for CUDA.
    """
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    if source.kind == "array":
        dataset = _ArrayBatches(source, preprocessing)
        workers = 0
    else:
        dataset = _FileBatches(source.files, preprocessing)
    sampler = BatchSampler(SequentialSampler(range(len(source))), batch_size, drop_last=False)
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_no_collate,
        pin_memory=pin_memory,
    )


def decoded_image_bytes(source: ImageSource, preprocessing: Preprocessing) -> int:
    """Bytes of one decoded image (H x W x C uint8), from the crop or the first image.

    For the shared-memory budget of data loader workers; an unreadable first
    image falls back to 224 x 224.
    """
    side = preprocessing.crop
    if side is not None:
        return side * side * preprocessing.channels
    if source.files:
        try:
            return _load_image(source.files[0], preprocessing).nbytes
        except (BadImage, CnnbalError):
            pass
    return 224 * 224 * preprocessing.channels


def check_same_size(source: ImageSource, images, positions, first):
    """All images must share one size after preprocessing (batches are stacked)."""
    import torch

    shape = tuple(images.shape[1:])
    if first is None:
        return shape, int(positions[0])
    first_shape, first_position = first
    if shape != first_shape:
        if images.dtype != torch.uint8:
            # float arrays (B, C, H, W) -> report as (H, W, C)
            shape, first_shape = shape[1:] + shape[:1], first_shape[1:] + first_shape[:1]
        raise CnnbalError(
            _size_mismatch(
                source.name(int(positions[0])),
                shape,
                source.name(first_position),
                first_shape,
            )
        )
    return first
