"""Run a torch image classifier over images and write the probability file.

This is the optional front end of cnnbal (the ``extract`` extra: torch and
Pillow). It turns a trained classifier and a set of images into the parquet
file that :mod:`cnnbal.io` reads::

    label   int64                        (only when the labels are known)
    probs   fixed_size_list<float32>[K]  softmax of the logits, rows sum to 1
    logits  fixed_size_list<float32>[K]  (only with ``save_logits=True``)
    path    string                       file path, or "images.npz[17]" for arrays

with the class names as a JSON list under the schema metadata key
``b"cnnbal.class_names"``.

torch and Pillow are imported inside the functions that need them, so that
``import cnnbal`` never pulls in torch.

Preprocessing (see :class:`Preprocessing`), in this order, per image:

1. decode with Pillow and convert to RGB (``channels=3``) or luminance
   (``channels=1``, Pillow's ``"L"``: ITU-R 601-2 weights);
2. if ``size`` is set, resize (bilinear, antialiased) so that the shorter side
   is ``size`` pixels, keeping the aspect ratio (the longer side is
   ``int(size * long / short)``, as torchvision's ``Resize(size)``);
3. if ``crop`` is set, cut the central ``crop`` x ``crop`` square (offsets
   ``round((h - crop) / 2)``, as torchvision's ``CenterCrop``);
4. scale to [0, 1] (divide by 255) and normalise each channel,
   ``(x - mean) / std``; channels first, float32, shape ``(C, H, W)``.

Steps 1-3 run on the CPU in the data loader (workers), step 4 on the target
device. Float arrays ``(N, C, H, W)`` are taken as already scaled to [0, 1]:
they skip the division, are resized with ``torch.nn.functional.interpolate``
(bilinear, antialiased) and then normalised; pass ``mean=(0.0,)`` and
``std=(1.0,)`` for arrays that are already normalised.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnbal._install import install_hint
from cnnbal.errors import CnnbalError
from cnnbal.io import CLASS_NAMES_KEY

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The extensions torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
)
#: How to install torch and Pillow (the editable form from a source checkout).
INSTALL_HINT = install_hint("extract")
MAX_ROWS_PER_GROUP = 65536
# Rows are buffered up to about this many bytes of probs/logits before a row
# group is written: few, large row groups without memory growing with N.
_ROW_GROUP_BYTES = 32 * 2**20

ProgressCallback = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images become model input (see the module docstring for the exact steps).

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


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSource:
    """The images to run the model over, as found by :func:`discover`.

    Attributes
    ----------
    path : Path
        The folder or array file, as given.
    kind : {"classes", "flat", "array"}
        A folder with one subfolder per class, a flat folder of images, or an
        ``.npy`` / ``.npz`` array.
    files : tuple of Path
        The image files in order (empty for arrays).
    labels : ndarray of shape (n_images,) int64 or None
        The true class of each image, when known.
    class_names : list of str or None
        Sorted class folder names (``kind="classes"``) or names given to
        :func:`discover`, else None (the output then carries no names).
    images : ndarray or None
        For arrays: the images, ``(N, H, W, C)`` uint8 or ``(N, C, H, W)``
        float (memory-mapped for ``.npy``); None for folders.
    """

    path: Path
    kind: str
    files: tuple[Path, ...] = ()
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)

    def name(self, index: int) -> str:
        """The ``path`` column value of image ``index``."""
        if self.kind == "array":
            return f"{self.path}[{index}]"
        return str(self.files[index])


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
        The device the model ran on, e.g. ``"cpu"`` or ``"cuda:0"``.
    seconds : float
        Wall-clock time of the whole run, from loading the first batch to the
        renamed output file.
    class_names : list of str or None
        The class names written to the file's metadata, K of them (None: none known).
    skipped : tuple of str
        The paths of the skipped images.
    """

    n_images: int
    n_skipped: int
    device: str
    seconds: float
    class_names: list[str] | None
    skipped: tuple[str, ...] = ()

    @property
    def images_per_second(self) -> float:
        """Throughput, ``(n_images + n_skipped) / seconds``."""
        return (self.n_images + self.n_skipped) / self.seconds if self.seconds > 0 else 0.0


def require_torch() -> None:
    """Raise :class:`CnnbalError` with the install command when torch or Pillow is missing."""
    try:
        import PIL  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        raise CnnbalError(
            f"extract needs torch and Pillow ({error.name or error} is missing): {INSTALL_HINT}"
        ) from None


def load_model(
    spec: str | os.PathLike, weights: str | os.PathLike | None = None
) -> torch.nn.Module:
    """Load a classifier for :func:`extract`, in eval mode, on the CPU.

    Parameters
    ----------
    spec : str or path
        Either a TorchScript archive written by ``torch.jit.save``, or
        ``"package.module:factory"``: the factory is called with no arguments
        and must return a ``torch.nn.Module``. The module is imported from the
        installed packages, ``sys.path`` or the current directory.
    weights : str or path, optional
        A state dict saved with ``torch.save`` (optionally wrapped as
        ``{"state_dict": ...}``) to load into the factory's model. Read with
        ``torch.load(..., weights_only=True)``: no arbitrary objects are
        unpickled. Only with a factory.

    Returns
    -------
    model : torch.nn.Module
        Maps a float batch of shape (B, C, H, W) to logits of shape (B, K).

    Raises
    ------
    CnnbalError
        The archive does not load, the factory does not import or does not
        return a module, or the weights do not load or do not fit the model.
    """
    require_torch()
    import torch

    text = os.fspath(spec)
    if _is_factory_spec(text):
        model = _call_factory(text)
        if weights is not None:
            _load_weights(model, Path(weights), text)
    else:
        path = Path(text)
        if weights is not None:
            raise CnnbalError(
                f"{path}: --weights goes with a 'package.module:factory' model, "
                "not with a TorchScript archive"
            )
        if not path.is_file():
            raise CnnbalError(f"{path}: no such model file")
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:  # torch raises many types for a file that is not an archive
            raise CnnbalError(
                f"{path}: not a TorchScript archive ({_first_line(error)}); save the model "
                "with torch.jit.save, or pass 'package.module:factory' and --weights"
            ) from None
    return model.eval()


def discover(
    data_path: str | os.PathLike,
    *,
    labels_path: str | os.PathLike | None = None,
    class_names: list[str] | None = None,
) -> ImageSource:
    """Find the images under ``data_path`` and their labels.

    Parameters
    ----------
    data_path : str or path
        One of:

        - a folder with one subfolder per class (``root/cat/x.png``): the
          sorted subfolder names are the class names, their indices the labels,
          and image files anywhere below a class folder are used, in sorted
          order (as torchvision's ``ImageFolder``);
        - a flat folder of image files: no labels;
        - an ``.npz`` file with an ``images`` array and an optional ``labels``
          array, or an ``.npy`` file of images (memory-mapped). Images are
          ``(N, H, W, C)`` uint8 or ``(N, C, H, W)`` float in [0, 1], with
          C in {1, 3}.

        Files are recognised by extension (``.png``, ``.jpg``, ...); other
        files and hidden entries are ignored.
    labels_path : str or path, optional
        An ``.npy`` file of ``N`` integer labels, for array data.
    class_names : list of str, optional
        The model's class names, in output order: for flat folders and arrays,
        or to replace the folder names of a class-folder tree (same count).

    Returns
    -------
    source : ImageSource

    Raises
    ------
    CnnbalError
        The path does not exist, holds no images, mixes image files with class
        folders, or an array or its labels have the wrong shape or type.
    """
    path = Path(data_path)
    if not path.exists():
        raise CnnbalError(f"{path}: no such file or folder")
    if path.is_dir():
        if labels_path is not None:
            raise CnnbalError(
                f"{labels_path}: --labels goes with .npy data; an image folder gets its "
                "labels from its class subfolders"
            )
        source = _discover_folder(path)
    elif path.suffix.lower() not in (".npy", ".npz"):
        raise CnnbalError(f"{path}: expected an image folder or an .npy/.npz array")
    else:
        source = _discover_array(path, None if labels_path is None else Path(labels_path))
    if class_names is None:
        return source
    if source.class_names is not None and len(class_names) != len(source.class_names):
        raise CnnbalError(
            f"{path}: {len(class_names)} class names given for {len(source.class_names)} "
            "class folders"
        )
    if source.labels is not None and len(source.labels) and source.labels.max() >= len(class_names):
        raise CnnbalError(
            f"{path}: label {source.labels.max()} is out of range for {len(class_names)} "
            "class names"
        )
    return dataclasses.replace(source, class_names=list(class_names))


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
    return _load_image(Path(path), preprocessing)


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
    mean, std = _normalisation_tensors(preprocessing, tensor.device)
    return _normalise(tensor, mean, std)


def resolve_device(device: str = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` into an available device.

    ``"auto"`` picks the current CUDA device when CUDA is available, else the
    CPU (MPS only when asked for).

    Raises
    ------
    CnnbalError
        The name is not a device, or the device is not available.
    """
    require_torch()
    import torch

    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CnnbalError(
            f"--device: expected auto, cpu, cuda, cuda:N or mps, got {device!r}"
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise CnnbalError(f"--device {device}: CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise CnnbalError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) available"
            )
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise CnnbalError(f"--device {device}: MPS is not available")
    elif resolved.type != "cpu":
        raise CnnbalError(f"--device: expected auto, cpu, cuda, cuda:N or mps, got {device!r}")
    return resolved


def extract(
    model: torch.nn.Module,
    source: ImageSource,
    out_path: str | os.PathLike,
    *,
    preprocessing: Preprocessing = Preprocessing(),
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    amp: str | None = None,
    save_logits: bool = False,
    skip_bad: bool = False,
    progress: ProgressCallback | None = None,
) -> ExtractReport:
    """Run ``model`` over the images of ``source`` and write the probability file.

    The file is written batch by batch with ``pyarrow.parquet.ParquetWriter``
    (row groups of at most 65536 rows), to a temporary file in the target
    directory that is renamed to ``out_path`` at the end; on any error or
    interrupt the temporary file is removed and ``out_path`` is untouched.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a float batch of shape (B, C, H, W) to logits of shape (B, K);
        for class folders K must equal the number of classes. See
        :func:`load_model`. It is moved to ``device``.
    source : ImageSource
        From :func:`discover`.
    out_path : str or path
        The parquet file to write (replaced if it exists, never when it is
        one of the inputs).
    preprocessing : Preprocessing
        How images become model input.
    device : str, default "auto"
        See :func:`resolve_device`.
    batch_size : int, default 64
        Images per forward pass.
    workers : int or None, default None
        Data loader processes that decode image files; 0 decodes in this
        process. None picks 0 on the CPU (the forward pass already uses every
        core: measured no faster with workers on 2 cores) and
        ``min(8, n_cpus)`` on CUDA or MPS. Arrays are always read in this
        process.
    amp : {None, "bf16", "fp16"}, default None
        Run the forward pass under ``torch.autocast`` with this dtype: bf16 on
        CUDA or CPU, fp16 on CUDA. The softmax is always computed in float32.
    save_logits : bool, default False
        Also write the ``logits`` column.
    skip_bad : bool, default False
        Skip (and count) images that cannot be decoded instead of failing.
    progress : callable, optional
        Called as ``progress(n_done, n_total)`` after every batch, with
        ``n_done`` counting skipped images too.

    Returns
    -------
    report : ExtractReport

    Raises
    ------
    CnnbalError
        An image cannot be read (without ``skip_bad``), images differ in size
        after preprocessing, the model's output width does not match the class
        folders or the labels, or the output path is unusable.
    """
    require_torch()
    import torch

    started = time.perf_counter()
    out = Path(out_path)
    _check_output_path(out, source)
    if batch_size < 1:
        raise CnnbalError(f"--batch-size: expected a positive number, got {batch_size}")
    if workers is not None and workers < 0:
        raise CnnbalError(f"--workers: expected 0 or more, got {workers}")
    if len(source) == 0:
        raise CnnbalError(f"{source.path}: no images")
    torch_device = resolve_device(device)
    autocast_dtype = _autocast_dtype(amp, torch_device)
    if workers is None:
        workers = 0 if torch_device.type == "cpu" else min(8, _n_cpus())

    model = model.to(torch_device).eval()
    mean, std = _normalisation_tensors(preprocessing, torch_device)
    loader = _make_loader(source, preprocessing, batch_size, workers, torch_device)
    n_total = len(source)
    writer = _BatchWriter(out, source, save_logits)
    batches = iter(loader)
    n_done = 0
    skipped: list[str] = []
    first_shape: tuple[tuple[int, ...], int] | None = None
    try:
        with torch.inference_mode():
            for positions, images, bad, fatal in batches:
                if fatal is not None:
                    raise CnnbalError(fatal)
                if bad and not skip_bad:
                    raise CnnbalError(f"{bad[0][1]} (--skip-bad skips unreadable images)")
                skipped.extend(source.name(position) for position, _ in bad)
                n_done += len(bad)
                if len(positions):
                    first_shape = _check_same_size(source, images, positions, first_shape)
                    batch = _normalise(images.to(torch_device, non_blocking=True), mean, std)
                    with torch.autocast(
                        torch_device.type,
                        dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None,
                    ):
                        logits = model(batch)
                    logits = _check_logits(logits, len(positions), source).float()
                    probs = torch.softmax(logits, dim=1)
                    writer.add(
                        positions.numpy(),
                        probs.cpu().numpy(),
                        logits.cpu().numpy() if save_logits else None,
                    )
                    n_done += len(positions)
                if progress is not None:
                    progress(n_done, n_total)
        if writer.n_rows == 0:
            raise CnnbalError(f"{source.path}: none of the {n_total} images could be read")
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        del batches  # shuts data loader workers down now, also on errors
    return ExtractReport(
        n_images=writer.n_rows,
        n_skipped=len(skipped),
        device=_describe_device(torch_device),
        seconds=time.perf_counter() - started,
        class_names=writer.class_names,
        skipped=tuple(skipped),
    )


# ---------------------------------------------------------------------------
# Private helpers: the public functions above have checked their inputs.


def _per_channel(values, default: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if values is None:
        values = default if channels == 3 else (sum(default) / len(default),)
    values = tuple(float(value) for value in values)
    return values * channels if len(values) == 1 else values


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _is_factory_spec(text: str) -> bool:
    """``package.module:factory``, as opposed to a file path (which may contain a drive colon)."""
    if Path(text).exists() or text.count(":") != 1:
        return False
    module, name = text.split(":")
    return (
        bool(module)
        and name.isidentifier()
        and all(part.isidentifier() for part in module.split("."))
    )


def _call_factory(spec: str):
    import torch

    module_name, factory_name = spec.split(":")
    # A console script does not put the current directory on sys.path, but a
    # user's own model module usually lives there.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CnnbalError(f"{spec}: cannot import {module_name} ({_first_line(error)})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise CnnbalError(f"{spec}: module {module_name} has no callable {factory_name}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise CnnbalError(
            f"{spec}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _load_weights(model, path: Path, spec: str) -> None:
    import torch

    if not path.is_file():
        raise CnnbalError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise CnnbalError(
            f"{path}: not a state dict torch.load(weights_only=True) can read "
            f"({_first_line(error)})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CnnbalError(f"{path}: expected a state dict, found {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as error:
        raise CnnbalError(f"{path}: the weights do not fit {spec} ({_first_line(error)})") from None


def _discover_folder(path: Path) -> ImageSource:
    entries = sorted(entry for entry in path.iterdir() if not entry.name.startswith("."))
    class_dirs = [entry for entry in entries if entry.is_dir()]
    top_images = [entry for entry in entries if _is_image_file(entry)]
    if not class_dirs:
        if not top_images:
            raise CnnbalError(f"{path}: no image files (expected .png, .jpg, ... files)")
        return ImageSource(path=path, kind="flat", files=tuple(top_images))
    if top_images:
        raise CnnbalError(
            f"{path}: has both image files ({top_images[0].name}, ...) and class folders "
            f"({class_dirs[0].name}, ...); use one layout"
        )
    files: list[Path] = []
    labels: list[int] = []
    for index, class_dir in enumerate(class_dirs):
        class_files = sorted(
            Path(root) / name
            for root, dirs, names in os.walk(class_dir, followlinks=True)
            for name in names
            if not name.startswith(".") and _is_image_file(Path(root) / name)
        )
        if not class_files:
            raise CnnbalError(f"{class_dir}: class folder has no image files")
        files.extend(class_files)
        labels.extend([index] * len(class_files))
    return ImageSource(
        path=path,
        kind="classes",
        files=tuple(files),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=[class_dir.name for class_dir in class_dirs],
    )


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _discover_array(path: Path, labels_path: Path | None) -> ImageSource:
    images, labels = _open_array(path)
    if labels is not None and labels_path is not None:
        raise CnnbalError(f"{path}: has a 'labels' array and --labels {labels_path} was given too")
    _check_images_array(images, path)
    if labels_path is not None:
        labels = _read_labels(labels_path)
        label_source = labels_path
    else:
        label_source = path
    if labels is not None:
        labels = _check_labels(labels, len(images), label_source)
    return ImageSource(path=path, kind="array", labels=labels, images=images)


def _open_array(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The images (memory-mapped for .npy) and the npz labels, if any."""
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise CnnbalError(
                    f"{path}: no 'images' array (found: {', '.join(archive.files) or 'none'})"
                )
            labels = archive["labels"] if "labels" in archive.files else None
            return archive["images"], labels
    except CnnbalError:
        raise
    except (OSError, ValueError, EOFError) as error:
        raise CnnbalError(f"{path}: cannot read the array ({_first_line(error)})") from None


def _check_images_array(images: np.ndarray, path: Path) -> None:
    layout = _array_layout(images)
    if layout is None:
        raise CnnbalError(
            f"{path}: images of shape {images.shape} and dtype {images.dtype}; expected "
            "(N, H, W, C) uint8 or (N, C, H, W) float with C in {1, 3}"
        )
    if len(images) == 0:
        raise CnnbalError(f"{path}: no images (the array has length 0)")


def _array_layout(images: np.ndarray) -> str | None:
    if images.ndim != 4:
        return None
    if images.dtype == np.uint8 and images.shape[3] in (1, 3):
        return "nhwc"
    if np.issubdtype(images.dtype, np.floating) and images.shape[1] in (1, 3):
        return "nchw"
    return None


def _read_labels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CnnbalError(f"{path}: no such labels file")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise CnnbalError(f"{path}: cannot read the labels ({_first_line(error)})") from None


def _check_labels(labels: np.ndarray, n_images: int, path: Path) -> np.ndarray:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CnnbalError(
            f"{path}: labels of shape {labels.shape} and dtype {labels.dtype}; expected "
            "one integer per image"
        )
    if len(labels) != n_images:
        raise CnnbalError(f"{path}: {len(labels)} labels for {n_images} images")
    if len(labels) and labels.min() < 0:
        raise CnnbalError(f"{path}: negative label {labels.min()}")
    return labels.astype(np.int64)


def _check_output_path(out: Path, source: ImageSource) -> None:
    if out.is_dir():
        raise CnnbalError(f"{out}: is a folder; expected a .parquet file path")
    if not out.parent.is_dir():
        raise CnnbalError(f"{out}: folder {out.parent} does not exist")
    if out.exists() and _is_input(out.resolve(), source):
        raise CnnbalError(f"{out}: is an input file; choose another output path")


def _is_input(resolved: Path, source: ImageSource) -> bool:
    if source.kind == "array":
        return source.path.resolve() == resolved
    if not resolved.is_relative_to(source.path.resolve()):
        return False
    # Resolve only the files that could match: one resolve per image would cost
    # seconds for a million images.
    return any(path.resolve() == resolved for path in source.files if path.name == resolved.name)


def _autocast_dtype(amp: str | None, device):
    import torch

    if amp is None or amp == "none":
        return None
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise CnnbalError(f"--amp: expected bf16 or fp16, got {amp!r}")
    if device.type == "cuda" or (device.type == "cpu" and amp == "bf16"):
        return dtypes[amp]
    raise CnnbalError(f"--amp {amp}: not supported on {device.type} (fp16 needs CUDA)")


def _n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def _normalisation_tensors(preprocessing: Preprocessing, device):
    import torch

    shape = (1, preprocessing.channels, 1, 1)
    mean = torch.tensor(preprocessing.channel_mean, dtype=torch.float32, device=device)
    std = torch.tensor(preprocessing.channel_std, dtype=torch.float32, device=device)
    return mean.view(shape), std.view(shape)


def _normalise(images, mean, std):
    """(B, H, W, C) uint8 or (B, C, H, W) float -> normalised (B, C, H, W) float32, contiguous."""
    import torch

    if images.dtype == torch.uint8:
        batch = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    else:
        batch = images.to(torch.float32, copy=True)
    return batch.sub_(mean).div_(std).contiguous()


def _load_image(path: Path, preprocessing: Preprocessing) -> np.ndarray:
    """Decode, convert, resize and crop: (H, W, C) uint8. Raises _BadImage or CnnbalError."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB" if preprocessing.channels == 3 else "L")
    except Exception as error:  # Pillow raises many types for a broken file
        raise _BadImage(f"{path}: cannot read image ({_first_line(error)})") from None
    return _resize_crop(image, preprocessing, path)


def _resize_crop(image, preprocessing: Preprocessing, name) -> np.ndarray:
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
    return _center_crop(pixels, preprocessing.crop, name, channels_last=True)


def _center_crop(pixels, crop: int | None, name, *, channels_last: bool):
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


class _BadImage(Exception):
    """An image file that cannot be decoded (skippable with skip_bad)."""


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
            except _BadImage as error:
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
        return positions, images, [], None

    def _uint8_batch(self, chunk: np.ndarray, start: int) -> np.ndarray:
        prep = self.preprocessing
        if prep.size is None and chunk.shape[3] == prep.channels:
            return np.stack(
                [
                    _center_crop(
                        image, prep.crop, f"{self.path}[{start + offset}]", channels_last=True
                    )
                    for offset, image in enumerate(chunk)
                ]
            )
        from PIL import Image

        mode = "RGB" if prep.channels == 3 else "L"
        return np.stack(
            [
                _resize_crop(
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
                chunk = chunk.expand(-1, 3, -1, -1)
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
        return _center_crop(chunk, prep.crop, f"{self.path}[{start}]", channels_last=False)


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


def _make_loader(source: ImageSource, preprocessing, batch_size, workers, device):
    import torch
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    if source.kind == "array":
        dataset = _ArrayBatches(source, preprocessing)
        workers = 0  # no decoding to spread; workers would copy the array
    else:
        dataset = _FileBatches(source.files, preprocessing)
    sampler = BatchSampler(SequentialSampler(range(len(source))), batch_size, drop_last=False)
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_no_collate,
        pin_memory=device.type == "cuda" and torch.cuda.is_available(),
    )


def _check_same_size(source: ImageSource, images, positions, first):
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


class _BatchWriter:
    """Buffers rows and writes them as row groups to a temporary file; renames at commit."""

    def __init__(self, out: Path, source: ImageSource, save_logits: bool):
        self.out = out
        self.source = source
        self.save_logits = save_logits
        self.temp_path = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        self.writer = None
        self.schema = None
        self.class_names: list[str] | None = None
        self.n_rows = 0
        self.rows_per_group = MAX_ROWS_PER_GROUP
        self.buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.n_buffered = 0

    def add(self, positions: np.ndarray, probs: np.ndarray, logits: np.ndarray | None) -> None:
        if self.writer is None:
            self._open(probs.shape[1])
        self.buffer.append((positions, probs, logits))
        self.n_buffered += len(positions)
        self.n_rows += len(positions)
        if self.n_buffered >= self.rows_per_group:
            self._flush()

    def _open(self, n_classes: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # no invented names ("0".."K-1"): they would clash with the real names
        # stored in an H fitted on class folders
        self.class_names = self.source.class_names
        vector = pa.list_(pa.float32(), n_classes)
        fields = []
        if self.source.labels is not None:
            fields.append(pa.field("label", pa.int64()))
        fields.append(pa.field("probs", vector))
        if self.save_logits:
            fields.append(pa.field("logits", vector))
        fields.append(pa.field("path", pa.string()))
        metadata = (
            {CLASS_NAMES_KEY: json.dumps(self.class_names).encode()} if self.class_names else None
        )
        self.schema = pa.schema(fields, metadata=metadata)
        bytes_per_row = 4 * n_classes * (2 if self.save_logits else 1) + 64
        self.rows_per_group = int(
            min(MAX_ROWS_PER_GROUP, max(1024, _ROW_GROUP_BYTES // bytes_per_row))
        )
        self.writer = pq.ParquetWriter(self.temp_path, self.schema, use_dictionary=False)

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.buffer:
            return
        positions = np.concatenate([item[0] for item in self.buffer])
        columns = []
        if self.source.labels is not None:
            columns.append(pa.array(self.source.labels[positions], type=pa.int64()))
        columns.append(_vectors([item[1] for item in self.buffer]))
        if self.save_logits:
            columns.append(_vectors([item[2] for item in self.buffer]))
        columns.append(pa.array([self.source.name(int(i)) for i in positions], type=pa.string()))
        table = pa.Table.from_arrays(columns, schema=self.schema)
        self.writer.write_table(table, row_group_size=MAX_ROWS_PER_GROUP)
        self.buffer = []
        self.n_buffered = 0

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        self.writer = None
        os.replace(self.temp_path, self.out)

    def abort(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            self.writer = None
            self.temp_path.unlink(missing_ok=True)


def _vectors(blocks: list[np.ndarray]):
    """(n, K) float32 blocks -> one fixed-size-list<float32>[K] array."""
    import pyarrow as pa

    values = np.concatenate(blocks).astype(np.float32, copy=False)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
