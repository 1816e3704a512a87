"""Devices: choosing one, its precision, placing the model, and what its errors mean.

Everything here that differs between the CPU and CUDA is a plain function of
its arguments (a device, a capability, a shared-memory size, an exception), so
that the CPU test suite can check the CUDA decisions.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from cnnbal.errors import CnnbalError
from cnnbal.extract.preprocessing import first_line, require_torch

if TYPE_CHECKING:
    import torch

# Batches a DataLoader worker keeps in flight (torch's default prefetch_factor),
# plus the one the main process is reading: each lives in shared memory.
_BATCHES_PER_WORKER = 3
# Workers may use at most this fraction of the free shared memory (/dev/shm):
# a container's default is 64 MB, and running out is a bus error, not an exception.
_SHM_FRACTION = 0.5
_MAX_DEFAULT_WORKERS = 8
_DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` into an available device.

    ``"auto"`` picks the current CUDA device when CUDA is available, else the
    CPU (MPS only when asked for). A CUDA device always comes back with its
    index (``cuda`` -> ``cuda:0`` when device 0 is current), so that it
    compares equal to the device of a tensor placed on it.

    Raises
    ------
    CnnbalError
        The name is not a device, the device is not available, or it is
        ``cpu:N`` (the CPU has one device: ``cpu``).
    """
    require_torch()
    import torch

    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise CnnbalError(f"--device: expected {_DEVICE_CHOICES}, got {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise CnnbalError(f"--device {device}: CUDA is not available")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= count:
            raise CnnbalError(f"--device {device}: only {count} CUDA device(s) available")
        return torch.device("cuda", index)
    if resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise CnnbalError(f"--device {device}: MPS is not available")
        return resolved
    if resolved.type == "cpu":
        if resolved.index not in (None, 0):
            raise CnnbalError(
                f"--device {device}: the CPU is one device; use --device cpu "
                "(torch uses every core)"
            )
        return torch.device("cpu")
    raise CnnbalError(f"--device: expected {_DEVICE_CHOICES}, got {device!r}")


def autocast_dtype(amp: str | None, device: torch.device):
    """The ``torch.autocast`` dtype for ``--amp`` on ``device``, or None for float32.

    bf16 runs on the CPU and on CUDA devices with native bf16 (compute
    capability 8.0 or later, checked on ``device`` itself, not on the current
    device); fp16 runs on CUDA only.

    Raises
    ------
    CnnbalError
        The combination is not supported; the message says what is.
    """
    import torch

    if amp is None or amp == "none":
        return None
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise CnnbalError(f"--amp: expected bf16 or fp16, got {amp!r}")
    if device.type == "cuda":
        if amp == "bf16" and torch.version.hip is None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            capability = torch.cuda.get_device_capability(index)
            if tuple(capability) < (8, 0):
                raise CnnbalError(
                    f"--amp bf16: cuda:{index} ({torch.cuda.get_device_name(index)}, compute "
                    f"capability {capability[0]}.{capability[1]}) has no bf16 support; "
                    "use --amp fp16 or no --amp"
                )
        return dtypes[amp]
    if device.type == "cpu":
        if amp == "bf16":
            return dtypes[amp]
        raise CnnbalError("--amp fp16: needs CUDA; on the CPU use --amp bf16 or no --amp")
    raise CnnbalError(
        f"--amp {amp}: not supported on {device.type} (bf16 runs on CUDA and the CPU, "
        "fp16 on CUDA); run without --amp"
    )


def precision_name(autocast: torch.dtype | None, tf32: bool, device: torch.device) -> str:
    """What the forward pass computes in: ``"float32"``, ``"tf32"``, ``"bf16"`` or ``"fp16"``."""
    import torch

    if autocast is not None:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast]
    return "tf32" if tf32 and device.type == "cuda" else "float32"


@contextlib.contextmanager
def float32_precision(tf32: bool) -> Iterator[None]:
    """Let CUDA matmuls and cuDNN convolutions use TF32 (``tf32=True``) or IEEE float32.

    torch's own default lets cuDNN convolutions use TF32, so CUDA float32
    results differ from the CPU's by about 1e-5 to 1e-4; extract's default
    (``tf32=False``) asks for IEEE float32. The previous settings are restored
    on exit (they are process-wide).
    """
    import torch

    value = "tf32" if tf32 else "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        # torch >= 2.9: the per-backend API (mixing it with allow_tf32 is an error)
        settings = [(torch.backends.cuda.matmul, "fp32_precision"), (conv, "fp32_precision")]
    else:
        value = tf32
        settings = [
            (torch.backends.cuda.matmul, "allow_tf32"),
            (torch.backends.cudnn, "allow_tf32"),
        ]
    previous = [getattr(owner, name) for owner, name in settings]
    try:
        for owner, name in settings:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name), old in zip(settings, previous, strict=True):
            setattr(owner, name, old)


@contextlib.contextmanager
def model_on(model, device: torch.device, model_name: str) -> Iterator[None]:
    """Move ``model`` to ``device`` in eval mode for the block; put it back afterwards.

    The caller's model comes back on the device and in the train/eval mode it
    had, also when the block fails, so that a test (or a notebook) that runs
    it on CPU inputs afterwards still can.

    Raises
    ------
    CnnbalError
        The model's tensors are spread over several devices, or moving it
        fails (out of memory, a busy device).
    """
    import itertools

    devices = {tensor.device for tensor in itertools.chain(model.parameters(), model.buffers())}
    if len(devices) > 1:
        names = ", ".join(sorted(str(found) for found in devices))
        raise CnnbalError(
            f"{model_name}: the model's tensors are on several devices ({names}); "
            "move it to one device first"
        )
    original = devices.pop() if devices else None
    moved = original is not None and original != device
    training = model.training
    try:
        if moved:
            try:
                model.to(device)
            except Exception as error:  # CUDA reports device trouble in many types
                raise device_error(error, model_name, device, None) from None
        model.eval()
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            _restore(model, original if moved else None, training)
        raise
    else:
        _restore(model, original if moved else None, training)


def device_error(error: Exception, model_name: str, device, batch_size: int | None):
    """A one-line :class:`CnnbalError` for an exception from moving or running the model.

    Out of memory suggests a smaller ``--batch-size``; a device mismatch (a
    TorchScript model traced with a device baked in) and a busy device say
    what to do about them; anything else is the model failing on the input.
    """
    import torch

    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    message = first_line(error)
    lowered = message.lower()
    # CUDA's OutOfMemoryError, MPS's "out of memory", the CPU's "can't allocate memory"
    if isinstance(error, out_of_memory) or any(
        text in lowered for text in ("out of memory", "can't allocate memory")
    ):
        if batch_size is None or batch_size <= 1:
            hint = "free the device or use a smaller model"
        else:
            hint = f"lower --batch-size (e.g. --batch-size {max(1, batch_size // 2)})"
        what = "moving the model" if batch_size is None else f"a batch of {batch_size} images"
        return CnnbalError(
            f"{model_name}: out of memory on {device} with {what} ({message}); {hint}"
        )
    # "Expected all tensors to be on the same device ...", or a convolution's
    # "Input type (torch.cuda.FloatTensor) and weight type (torch.FloatTensor) should be the same"
    if "same device" in lowered or ("should be the same" in lowered and "cuda" in lowered):
        return CnnbalError(
            f"{model_name}: the model mixes devices on {device} ({message}); a model traced "
            "or saved with tensors on another device keeps them: save it from a model on "
            f"{device}, or run with --device cpu (lower --batch-size if memory was the reason)"
        )
    if "busy or unavailable" in lowered or "no cuda gpus are available" in lowered:
        return CnnbalError(
            f"{device}: the device is busy or unavailable ({message}); it may be in "
            "exclusive-process mode and used by another process: choose another with "
            "--device cuda:N, or wait"
        )
    if batch_size is None:
        return CnnbalError(
            f"{model_name}: cannot move the model to {device} ({type(error).__name__}: {message})"
        )
    return CnnbalError(
        f"{model_name}: the model failed on {device} with a batch of {batch_size} images "
        f"({type(error).__name__}: {message}); check --channels, --size and --crop "
        "against the input the model expects"
    )


def describe_device(device: torch.device) -> str:
    """``"cpu"``, ``"mps"`` or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def default_workers(device: torch.device) -> int:
    """Data loader processes when none are asked for: 0 on the CPU, ``min(8, CPUs)`` otherwise.

    On the CPU the forward pass already uses every core (measured no faster
    with workers on 2 cores).
    """
    return 0 if device.type == "cpu" else min(_MAX_DEFAULT_WORKERS, _n_cpus())


def workers_for_shared_memory(workers: int, batch_bytes: int, shm_free_bytes: int | None) -> int:
    """Cap ``workers`` so that their batches fit in half of the free shared memory.

    Each worker keeps about 3 batches in ``/dev/shm``; when they do not fit
    the worker dies of a bus error. None for ``shm_free_bytes`` (no
    ``/dev/shm``: macOS, Windows) leaves ``workers`` as it is.

    Parameters
    ----------
    workers : int
        Processes asked for.
    batch_bytes : int
        Bytes of one decoded batch (batch size x height x width x channels).
    shm_free_bytes : int or None
        Free bytes of ``/dev/shm``.

    Returns
    -------
    workers : int
        At most the number asked for; 0 means decode in the main process.
    """
    if shm_free_bytes is None or workers == 0:
        return workers
    per_worker = max(1, _BATCHES_PER_WORKER * batch_bytes)
    return max(0, min(workers, int(shm_free_bytes * _SHM_FRACTION) // per_worker))


def shm_free_bytes(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory file system, or None where there is none."""
    try:
        status = os.statvfs(path)
    except (OSError, AttributeError):  # no /dev/shm, or no statvfs (Windows)
        return None
    return status.f_bavail * status.f_frsize


def _restore(model, original, training: bool) -> None:
    if original is not None:
        model.to(original)
    model.train(training)


def _n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
