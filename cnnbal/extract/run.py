"""The run loop: batches through the model, checked, into the writer."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnbal.errors import CnnbalError
from cnnbal.extract import batches as _batches
from cnnbal.extract import devices as _devices
from cnnbal.extract.preprocessing import (
    Preprocessing,
    normalisation_tensors,
    normalise,
    require_torch,
)
from cnnbal.extract.sources import ImageSource
from cnnbal.extract.writer import OutputFile, check_output_path

if TYPE_CHECKING:
    import torch

ProgressCallback = Callable[[int, int], None]
# The clock of the reported time; a test replaces it to check what is timed.
_clock = time.perf_counter


@dataclasses.dataclass(frozen=True)
class ExtractReport:
    """What :func:`extract` did.

    Attributes
    ----------
    n_images : int
        Rows written (images that were read and scored).
    n_skipped : int
        Unreadable images skipped (only with ``skip_bad=True``).
    device : str
        The device the model ran on, e.g. ``"cpu"`` or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``.
    seconds : float
        Wall-clock time from asking for the first batch to the renamed output
        file: the throughput a user can plan with. Device start-up and moving
        the model are in ``setup_seconds`` instead.
    class_names : list of str or None
        The class names written to the file's metadata, K of them (None: none known).
    skipped : tuple of str
        The paths of the skipped images.
    setup_seconds : float
        Moving the model to the device (CUDA's start-up happens there) and
        starting the data loader's workers.
    n_classes : int
        K, the width of the ``probs`` column.
    precision : {"float32", "tf32", "bf16", "fp16"}
        What the forward pass computed in (the softmax is always float32).
    batch_size : int
        Images per forward pass.
    workers : int
        Data loader processes used (after the shared-memory cap).
    output : str
        The file written.
    notes : tuple of str
        Choices made for the user that they may want to know about (a
        lowered number of workers).
    """

    n_images: int
    n_skipped: int
    device: str
    seconds: float
    class_names: list[str] | None
    skipped: tuple[str, ...] = ()
    setup_seconds: float = 0.0
    n_classes: int = 0
    precision: str = "float32"
    batch_size: int = 0
    workers: int = 0
    output: str = ""
    notes: tuple[str, ...] = ()

    @property
    def images_per_second(self) -> float:
        """Throughput, ``(n_images + n_skipped) / seconds``."""
        return (self.n_images + self.n_skipped) / self.seconds if self.seconds > 0 else 0.0


def extract(
    model: torch.nn.Module,
    source: ImageSource,
    out_path: str | os.PathLike,
    *,
    preprocessing: Preprocessing = Preprocessing(),
    device: str | torch.device = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    amp: str | None = None,
    tf32: bool = False,
    save_logits: bool = False,
    skip_bad: bool = False,
    progress: ProgressCallback | None = None,
    inputs: tuple[str | os.PathLike, ...] = (),
    model_name: str = "the model",
) -> ExtractReport:
    """Run ``model`` over the images of ``source`` and write the probability file.

    The file is written batch by batch (row groups of at most 65536 rows)
    through :func:`cnnbal.io.atomic_output`: a temporary file in the target
    folder renamed to ``out_path`` at the end; on any error or interrupt the
    temporary file is removed and ``out_path`` is untouched.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a float batch of shape (B, C, H, W) to logits of shape (B, K);
        for class folders K must equal the number of classes. See
        :func:`~cnnbal.extract.load_model`. It runs on ``device`` in eval mode
        and is given back on its own device and in its own train/eval mode.
    source : ImageSource
        From :func:`~cnnbal.extract.discover`.
    out_path : str or path
        The ``.parquet`` file to write (replaced if it exists, never when it
        is one of the inputs).
    preprocessing : Preprocessing
        How images become model input.
    device : str or torch.device, default "auto"
        See :func:`~cnnbal.extract.resolve_device`.
    batch_size : int, default 64
        Images per forward pass.
    workers : int or None, default None
        Data loader processes that decode image files; 0 decodes in this
        process. None picks 0 on the CPU and ``min(8, n_cpus)`` on CUDA or
        MPS. Either way the number is lowered so that the workers' batches fit
        in half of the free ``/dev/shm`` (a container's default 64 MB would
        otherwise end in a bus error). Arrays are always read in this process.
    amp : {None, "bf16", "fp16"}, default None
        Run the forward pass under ``torch.autocast`` with this dtype: bf16 on
        the CPU or a CUDA device with bf16 support, fp16 on CUDA. The softmax
        is always computed in float32.
    tf32 : bool, default False
        Let CUDA convolutions and matmuls use TF32 (faster on Ampere and later,
        probabilities differ from the CPU's by about 1e-4). The default is
        IEEE float32, whatever torch's own default.
    save_logits : bool, default False
        Also write the ``logits`` column.
    skip_bad : bool, default False
        Skip (and count) images that cannot be decoded instead of failing.
    progress : callable, optional
        Called as ``progress(n_done, n_total)`` after every batch, with
        ``n_done`` counting skipped images too.
    inputs : tuple of path, default ()
        Other files the output must not replace (the model, its weights, the
        labels and class-name files).
    model_name : str, default "the model"
        How error messages name the model (its file or factory).

    Returns
    -------
    report : ExtractReport

    Raises
    ------
    CnnbalError
        An image cannot be read (without ``skip_bad``), images differ in size
        after preprocessing, the model fails on a batch (wrong input, out of
        memory, a device error) or returns something other than (B, K) finite
        logits, K does not match the class folders or the labels, or the
        output cannot be written.
    """
    require_torch()
    import torch

    out = Path(out_path)
    check_output_path(out, source, tuple(inputs))
    if batch_size < 1:
        raise CnnbalError(f"--batch-size: expected a positive number, got {batch_size}")
    if workers is not None and workers < 0:
        raise CnnbalError(f"--workers: expected 0 or more, got {workers}")
    if len(source) == 0:
        raise CnnbalError(f"{source.path}: no images")
    torch_device = _devices.resolve_device(device)
    autocast = _devices.autocast_dtype(amp, torch_device)
    workers, notes = _choose_workers(workers, torch_device, source, preprocessing, batch_size)
    run = _Run(
        source=source,
        device=torch_device,
        autocast=autocast,
        amp=amp,
        save_logits=save_logits,
        skip_bad=skip_bad,
        progress=progress,
        model_name=model_name,
    )

    setup_started = _clock()
    with (
        _devices.model_on(model, torch_device, model_name),
        _devices.float32_precision(tf32),
        torch.inference_mode(),
    ):
        mean, std = normalisation_tensors(preprocessing, torch_device)
        loader = _batches.make_loader(
            source, preprocessing, batch_size, workers, pin_memory=torch_device.type == "cuda"
        )
        batches = iter(loader)  # starts the workers
        started = _clock()
        try:
            with OutputFile(out, source, save_logits, inputs) as writer:
                run.loop(model, batches, writer, mean, std)
        finally:
            del batches  # shuts data loader workers down now, also on errors
        finished = _clock()
    return ExtractReport(
        n_images=writer.n_rows,
        n_skipped=len(run.skipped),
        device=_devices.describe_device(torch_device),
        seconds=finished - started,
        class_names=writer.class_names,
        skipped=tuple(run.skipped),
        setup_seconds=started - setup_started,
        n_classes=writer.n_classes,
        precision=_devices.precision_name(autocast, tf32, torch_device),
        batch_size=batch_size,
        workers=workers if source.kind != "array" else 0,
        output=str(out),
        notes=notes,
    )


# ---------------------------------------------------------------------------
# Private helpers: extract has checked its arguments.


@dataclasses.dataclass
class _Run:
    """The per-batch work of one :func:`extract` call."""

    source: ImageSource
    device: torch.device
    autocast: torch.dtype | None
    amp: str | None
    save_logits: bool
    skip_bad: bool
    progress: ProgressCallback | None
    model_name: str
    skipped: list[str] = dataclasses.field(default_factory=list)

    def loop(self, model, batches, writer, mean, std) -> None:
        source, n_done, n_total = self.source, 0, len(self.source)
        first_shape: tuple[tuple[int, ...], int] | None = None
        for positions, images, bad, fatal in batches:
            if fatal is not None:
                raise CnnbalError(fatal)
            if bad and not self.skip_bad:
                raise CnnbalError(f"{bad[0][1]} (--skip-bad skips unreadable images)")
            self.skipped.extend(source.name(position) for position, _ in bad)
            n_done += len(bad)
            if len(positions):
                first_shape = _batches.check_same_size(source, images, positions, first_shape)
                probs, logits = self.forward(model, images, mean, std)
                host_positions = positions.numpy()
                _check_finite(probs, logits, host_positions, source, self.amp)
                writer.add(host_positions, probs, logits)
                n_done += len(positions)
            if self.progress is not None:
                self.progress(n_done, n_total)
        if writer.n_rows == 0:
            raise CnnbalError(f"{source.path}: none of the {n_total} images could be read")

    def forward(self, model, images, mean, std) -> tuple[np.ndarray, np.ndarray | None]:
        """One batch: (B, ...) host images -> host probs (B, K) float32 and logits or None."""
        import torch

        try:
            batch = normalise(images.to(self.device, non_blocking=True), mean, std)
            with torch.autocast(
                self.device.type,
                dtype=self.autocast or torch.float32,
                enabled=self.autocast is not None,
            ):
                logits = model(batch)
            logits = _check_logits(logits, len(images), self.source).float()
            probs = torch.softmax(logits, dim=1).cpu().numpy()
            host_logits = logits.cpu().numpy() if self.save_logits else None
        except CnnbalError:
            raise
        except Exception as error:  # the model's code, or the device under it
            raise _devices.device_error(error, self.model_name, self.device, len(images)) from None
        return probs, host_logits


def _choose_workers(workers, device, source: ImageSource, preprocessing, batch_size):
    """Workers asked for (or the default), capped by the shared memory; and a note if lowered."""
    if source.kind == "array":
        return 0, ()
    asked = _devices.default_workers(device) if workers is None else workers
    if asked == 0:
        return 0, ()
    batch_bytes = batch_size * _batches.decoded_image_bytes(source, preprocessing)
    free = _devices.shm_free_bytes()
    capped = _devices.workers_for_shared_memory(asked, batch_bytes, free)
    if capped == asked:
        return asked, ()
    note = (
        f"{capped} data loader worker(s) instead of {asked}: their batches must fit in "
        f"/dev/shm ({free / 2**20:.0f} MB free); a larger --shm-size, or a smaller "
        "--batch-size, allows more"
    )
    return capped, (note,)


def _check_logits(logits, batch_size: int, source: ImageSource):
    import torch

    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != batch_size:
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CnnbalError(
            f"{source.path}: the model returned {found} for a batch of {batch_size}; "
            "expected logits of shape (batch, n_classes)"
        )
    n_outputs = logits.shape[1]
    if source.class_names is not None and n_outputs != len(source.class_names):
        what = "class folders" if source.kind == "classes" else "class names"
        raise CnnbalError(
            f"{source.path}: {len(source.class_names)} {what} but the model outputs "
            f"{n_outputs} classes"
        )
    if source.labels is not None and len(source.labels) and source.labels.max() >= n_outputs:
        raise CnnbalError(
            f"{source.path}: label {source.labels.max()} is out of range for a model with "
            f"{n_outputs} outputs"
        )
    return logits


def _check_finite(probs, logits, positions, source: ImageSource, amp: str | None) -> None:
    """Refuse a batch whose probabilities (or saved logits) are not all finite.

    Checked on the host copy, which is made anyway: no extra device sync. The
    message names the first bad image and says what to change.
    """
    bad_rows = ~np.isfinite(probs).all(axis=1)
    if logits is not None:
        bad_rows |= ~np.isfinite(logits).all(axis=1)
    if not bad_rows.any():
        return
    first = int(np.argmax(bad_rows))
    n_bad = int(bad_rows.sum())
    more = f" (and {n_bad - 1} more in its batch)" if n_bad > 1 else ""
    if amp == "fp16":
        hint = "fp16 overflows above 65504: rerun with --amp bf16 or without --amp"
    elif amp == "bf16":
        hint = "rerun without --amp"
    else:
        hint = (
            "in float32, so the model itself produced inf or NaN; check its weights and "
            "the input normalisation (--mean/--std)"
        )
    raise CnnbalError(
        f"{source.name(int(positions[first]))}: the model's output is not finite (inf or NaN)"
        f"{more}; nothing was written; {hint}"
    )
