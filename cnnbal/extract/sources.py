"""Image discovery: class-folder trees, flat folders and image arrays, with their labels."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from cnnbal.errors import CnnbalError
from cnnbal.extract.preprocessing import first_line

# The extensions torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
)


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
          order (as torchvision's ``ImageFolder``); links to folders are
          followed, but each real folder is read once (no loops, no images
          counted twice);
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


# ---------------------------------------------------------------------------
# Private helpers: discover has checked its arguments.


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
    seen_dirs = {_dir_key(path)}
    for index, class_dir in enumerate(class_dirs):
        class_files = sorted(_image_files_below(class_dir, seen_dirs))
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


def _image_files_below(folder: Path, seen_dirs: set[tuple[int, int]]) -> list[Path]:
    """Image files anywhere below ``folder``, each real directory read once.

    Symbolic links to folders are followed (datasets are often trees of links)
    but a folder already read, from this class or another, is not read again:
    a link loop (``cat/again -> ..``) or a second link to one folder would
    otherwise count the same images many times.
    """
    found: list[Path] = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        key = _dir_key(Path(root))
        if key in seen_dirs:
            dirs[:] = []  # already read: neither its files nor its subfolders again
            continue
        seen_dirs.add(key)
        found.extend(
            Path(root) / name
            for name in names
            if not name.startswith(".") and _is_image_file(Path(root) / name)
        )
    return found


def _dir_key(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


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
        raise CnnbalError(f"{path}: cannot read the array ({first_line(error)})") from None


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
        raise CnnbalError(f"{path}: cannot read the labels ({first_line(error)})") from None


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
