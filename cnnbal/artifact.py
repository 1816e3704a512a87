"""The correction artifact: a small, self-describing ``.npz`` that plain numpy can read.

Every entry is a plain array (numbers or unicode strings), so
``numpy.load(path, allow_pickle=False)`` opens it without cnnbal. Format
version 2 (this one) stores one :class:`~cnnbal.corrections.Correction` of any
kind, its arrays under their own names:

========================  ====================================================
``format``                ``"cnnbal-h"`` (tells a foreign .npz apart)
``format_version``        int (2); a newer version than this cnnbal knows is refused
``kind``                  ``affine`` / ``logit_bias`` / ``temperature`` / ``vector_scaling``
``H``, ``gate``           affine: (K, K+1) float64 ``[W b]``; correct rows whose max < gate
``bias``, ``temperature`` logit_bias: (K,) float64 and a number: ``softmax((log p + bias) / T)``
``temperature``           temperature: a number: ``softmax(log p / T)``
``scale``, ``bias``       vector_scaling: (K,) float64 each: ``softmax(scale * log p + bias)``
``cnnbal_version``        the version that wrote it
``method``                how it was fitted (``elaborated``, ``class-dro``, ...)
``params``                JSON object of the method's hyper-parameters
``n_classes``             int K
``class_names``           (K,) str (empty strings when unknown)
``val_class_accuracy``    (K,) float64 raw per-class validation accuracy (NaN: no samples
                          or no labels)
``val_class_counts``      (K,) int64
``n_val``                 validation samples; ``n_competitive`` those in the competitive set
                          (affine fits; 0 otherwise)
``input_sha256``          SHA-256 of the validation file's bytes; ``input_name`` its name
``created``               ISO 8601 UTC time of the fit
``provenance``            JSON object: how it was made (the sweep or the cross-validation
                          that chose the hyper-parameters)
========================  ====================================================

Version 1 (cnnbal before multi-kind corrections) stored an affine H as ``H``
and its gate as ``apply_gate``, with no ``kind``; it still loads, as affine.

Loading reads the archive member by member and checks each member's name,
declared size, dtype and shape (from its ``.npy`` header) before reading its
data, so a small hostile file cannot make cnnbal allocate gigabytes.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnbal import __version__
from cnnbal.corrections import Correction
from cnnbal.errors import CnnbalError

if TYPE_CHECKING:  # `cnnbal info` reads an artifact without the core or the io package
    from cnnbal.core import FitParams, FitResult
    from cnnbal.methods import MethodFit

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_ARTIFACT_BYTES",
    "Artifact",
    "load_artifact",
    "save_artifact",
]

FORMAT_NAME = "cnnbal-h"
FORMAT_VERSION = 2
#: The most bytes an artifact's members may declare in all (an affine H of
#: about 11,000 classes); a larger declaration is refused before reading.
MAX_ARTIFACT_BYTES = 1 << 30
# A deflated member above _DEFLATE_FREE bytes may expand at most this many
# times: cnnbal writes members uncompressed (numpy.savez), so only a
# re-compressed file or a decompression bomb has them.
_DEFLATE_FREE = 16 << 20
_DEFLATE_RATIO = 50
# A string (a JSON field, a class name) longer than this is not metadata.
_MAX_STRING_BYTES = 16 << 20
# Correction parameters beyond these magnitudes overflow the arithmetic (an
# H entry of 1e300 turns every corrected row into NaN); fitted ones are O(10).
_MAX_PARAM_ABS = 1e6
_TEMPERATURE_RANGE = (1e-6, 1e6)

# Member schemas: dtype kinds ("U" str, "i" integer, "f" float) and shape
# ("K" = n_classes, "K+1"; () a scalar).
_INT, _FLOAT, _STR = "iu", "f", "U"
_METADATA: dict[str, tuple[str, tuple[str, ...]]] = {
    "format": (_STR, ()),
    "format_version": (_INT, ()),
    "cnnbal_version": (_STR, ()),
    "method": (_STR, ()),
    "params": (_STR, ()),
    "n_classes": (_INT, ()),
    "class_names": (_STR, ("K",)),
    "val_class_accuracy": (_FLOAT, ("K",)),
    "val_class_counts": (_INT, ("K",)),
    "n_val": (_INT, ()),
    "n_competitive": (_INT, ()),
    "input_sha256": (_STR, ()),
    "input_name": (_STR, ()),
    "created": (_STR, ()),
    "provenance": (_STR, ()),
}
_REQUIRED_METADATA = (
    "format",
    "format_version",
    "method",
    "params",
    "n_classes",
    "class_names",
    "val_class_accuracy",
    "val_class_counts",
)
#: The arrays of each correction kind (the names Correction.to_arrays writes).
_KIND_MEMBERS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "affine": {"H": (_FLOAT, ("K", "K+1")), "gate": (_FLOAT, ())},
    "logit_bias": {"bias": (_FLOAT, ("K",)), "temperature": (_FLOAT, ())},
    "temperature": {"temperature": (_FLOAT, ())},
    "vector_scaling": {"scale": (_FLOAT, ("K",)), "bias": (_FLOAT, ("K",))},
}
# Version 1: an affine H with its gate under another name, and no kind.
_V1_MEMBERS = {"H": (_FLOAT, ("K", "K+1")), "apply_gate": (_FLOAT, ())}


@dataclass(frozen=True)
class Artifact:
    """A loaded (or to-be-saved) correction artifact; see the module docstring.

    Attributes
    ----------
    correction : Correction
        What :func:`cnnbal.pipeline.correct` applies.
    method : str
        How it was fitted (a name of :data:`cnnbal.methods.METHOD_NAMES`).
    params : dict
        The method's hyper-parameters (given or chosen by cross-validation).
    class_names : list of str or None
    val_class_accuracy : ndarray of shape (n_classes,)
        Raw per-class validation accuracy (NaN: no samples, or fitted without labels).
    val_class_counts : ndarray of shape (n_classes,), int64
    n_val : int
    n_competitive : int
        Validation samples in the elaborated fit's competitive set (0 for other methods).
    """

    correction: Correction
    method: str
    params: dict
    class_names: list[str] | None
    val_class_accuracy: np.ndarray
    val_class_counts: np.ndarray
    n_val: int
    n_competitive: int = 0
    input_sha256: str = ""
    input_name: str = ""
    created: str = ""
    cnnbal_version: str = __version__
    format_version: int = FORMAT_VERSION
    provenance: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.val_class_accuracy)

    @property
    def kind(self) -> str:
        return self.correction.kind

    @property
    def H(self) -> np.ndarray:
        """The affine correction's ``[W b]``; a CnnbalError for other kinds."""
        if self.correction.kind != "affine":
            raise CnnbalError(f"a {self.correction.kind} correction has no H matrix")
        return self.correction.params["H"]

    @property
    def apply_gate(self) -> float:
        """Rows whose max is at or above this are left as they are (inf: none)."""
        return self.correction.gate

    @property
    def fit_params(self) -> FitParams | None:
        """The elaborated fit's parameters as :class:`FitParams` (None for other methods)."""
        if self.method != "elaborated":
            return None
        from cnnbal.core import FitParams

        return FitParams(**{k: float(self.params[k]) for k in ("r_low", "r_high", "beta", "alpha")})

    @classmethod
    def from_fit(
        cls,
        result: FitResult,
        *,
        class_names: list[str] | None = None,
        input_sha256: str = "",
        input_name: str = "",
        provenance: dict | None = None,
    ) -> Artifact:
        """Wrap a :class:`~cnnbal.core.FitResult` (an affine H) with its origin."""
        return cls(
            correction=Correction.affine(result.H, result.apply_gate),
            method=result.method,
            params=result.params.as_dict() if result.params is not None else {},
            class_names=list(class_names) if class_names is not None else None,
            val_class_accuracy=np.asarray(result.class_accuracy, dtype=np.float64),
            val_class_counts=np.asarray(result.class_counts, dtype=np.int64),
            n_val=int(result.n_samples),
            n_competitive=int(result.n_competitive),
            input_sha256=input_sha256,
            input_name=input_name,
            created=_now(),
            provenance=dict(provenance or {}),
        )

    @classmethod
    def from_method_fit(
        cls,
        fit: MethodFit,
        *,
        class_names: list[str] | None = None,
        input_sha256: str = "",
        input_name: str = "",
        provenance: dict | None = None,
    ) -> Artifact:
        """Wrap a :class:`~cnnbal.methods.MethodFit` (any method, any kind) with its origin.

        The hyper-parameters become ``params``; how cross-validation chose them
        (``fit.cv``) goes into the provenance under ``"cv"``.
        """
        correction = fit.correction
        n_classes = correction.n_classes
        if fit.class_accuracy is not None:
            accuracy = np.asarray(fit.class_accuracy, dtype=np.float64)
            counts = np.asarray(fit.class_counts, dtype=np.int64)
        else:  # fitted without labels: nothing is known per class
            if n_classes is None:
                raise CnnbalError(f"{fit.method}: the number of classes is unknown")
            accuracy = np.full(n_classes, np.nan)
            counts = np.zeros(n_classes, dtype=np.int64)
        result = fit.fit_result
        if result is not None and result.params is not None:
            params = result.params.as_dict()
        else:
            params = {k: float(v) for k, v in fit.hyper.items()}
        recorded = dict(provenance or {})
        if fit.cv is not None:
            recorded.setdefault("cv", fit.cv)
        return cls(
            correction=correction,
            method=fit.method,
            params=params,
            class_names=list(class_names) if class_names is not None else None,
            val_class_accuracy=accuracy,
            val_class_counts=counts,
            n_val=int(fit.n_samples),
            n_competitive=int(result.n_competitive) if result is not None else 0,
            input_sha256=input_sha256,
            input_name=input_name,
            created=_now(),
            provenance=recorded,
        )

    def describe(self) -> dict:
        """A JSON-ready summary: the kind and a digest of its parameters, not the arrays."""
        acc = self.val_class_accuracy
        finite = acc[np.isfinite(acc)]
        summary = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "cnnbal_version": self.cnnbal_version,
            "kind": self.kind,
            "method": self.method,
            "params": self.params,
        }
        summary.update(_describe_correction(self.correction, self.class_names))
        cv = self.provenance.get("cv")
        if isinstance(cv, dict) and "chosen" in cv and "name" in cv:
            grid = ", ".join(f"{v:g}" for v in cv.get("grid", []))
            summary["hyper_choice"] = (
                f"{cv['name']}={cv['chosen']:g} chosen by {cv.get('n_folds', '?')}-fold CV on "
                f"{cv.get('objective', '?')} from {grid}"
            )
        summary.update(
            {
                "n_classes": self.n_classes,
                "class_names": self.class_names,
                "n_val": self.n_val,
                "n_competitive": self.n_competitive,
                "val_accuracy_min": float(finite.min()) if finite.size else None,
                "val_accuracy_max": float(finite.max()) if finite.size else None,
                "input_name": self.input_name,
                "input_sha256": self.input_sha256,
                "created": self.created,
                "provenance": self.provenance,
            }
        )
        return summary


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe_correction(correction: Correction, class_names) -> dict:
    """The numbers that say what a correction does, per kind."""
    p = correction.params

    def extreme(values: np.ndarray, pick) -> str:
        k = int(pick(values))
        return f"{k} ({class_names[k]})" if class_names else str(k)

    if correction.kind == "affine":
        H = p["H"]
        k = H.shape[0]
        identity = np.hstack([np.eye(k), np.zeros((k, 1))])
        return {
            "apply_gate": float(p["gate"]),
            "h_max_abs": float(np.abs(H).max()),
            "h_distance_from_identity": float(np.linalg.norm(H - identity)),
        }
    if correction.kind == "logit_bias":
        bias = p["bias"]
        return {
            "temperature": float(p["temperature"]),
            "bias_min": float(bias.min()),
            "bias_max": float(bias.max()),
            # biases are defined up to a common constant: the spread is what acts
            "bias_range": float(bias.max() - bias.min()),
            "bias_lowest_class": extreme(bias, np.argmin),
            "bias_highest_class": extreme(bias, np.argmax),
        }
    if correction.kind == "temperature":
        return {"temperature": float(p["temperature"])}
    return {
        "scale_min": float(p["scale"].min()),
        "scale_max": float(p["scale"].max()),
        "bias_min": float(p["bias"].min()),
        "bias_max": float(p["bias"].max()),
    }


def save_artifact(path: str | os.PathLike, artifact: Artifact) -> Path:
    """Write ``artifact`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    k = artifact.n_classes
    names = artifact.class_names if artifact.class_names is not None else [""] * k
    arrays = {
        "format": np.array(FORMAT_NAME),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "cnnbal_version": np.array(artifact.cnnbal_version),
        **artifact.correction.to_arrays(),
        "method": np.array(artifact.method),
        "params": np.array(json.dumps(artifact.params, sort_keys=True)),
        "n_classes": np.array(k, dtype=np.int64),
        "class_names": np.array(names, dtype=str),
        "val_class_accuracy": np.asarray(artifact.val_class_accuracy, dtype=np.float64),
        "val_class_counts": np.asarray(artifact.val_class_counts, dtype=np.int64),
        "n_val": np.array(artifact.n_val, dtype=np.int64),
        "n_competitive": np.array(artifact.n_competitive, dtype=np.int64),
        "input_sha256": np.array(artifact.input_sha256),
        "input_name": np.array(artifact.input_name),
        "created": np.array(artifact.created),
        "provenance": np.array(json.dumps(artifact.provenance, sort_keys=True)),
    }
    from cnnbal.io import atomic_output

    with atomic_output(path, suffixes=(".npz",)) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


# ---------------------------------------------------------------- loading


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and check a correction artifact (format version 1 or 2).

    Raises
    ------
    CnnbalError
        Missing or unreadable file, not a cnnbal artifact, a newer format, an
        unknown or oversized member, a member of the wrong type or shape, or
        implausible values (non-finite or huge parameters, zero classes).
    """
    path = Path(path)
    name = path.name
    _check_artifact_path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if magic.startswith(b"\x93NUMPY"):
            raise CnnbalError(f"{name}: not a cnnbal H artifact (a .npy array, not an .npz)")
        if not magic.startswith(b"PK\x03\x04"):  # every .npz is a zip archive
            raise CnnbalError(f"{name}: not a cnnbal H artifact (not an .npz file)")
        with zipfile.ZipFile(path) as archive:
            return _read_archive(archive, name)
    except CnnbalError:
        raise
    except PermissionError:
        raise CnnbalError(f"{path}: permission denied") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CnnbalError(f"{name}: not a readable H artifact ({exc})") from None


def _check_artifact_path(path: Path) -> None:
    """Say what is wrong with a path that cannot be an artifact, in one line naming it.

    ``Path.is_file`` answers False for every failure, which once made a folder,
    a symbolic link loop and an unreadable file all read "no such file".
    """
    import errno
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            msg = f"{path}: a symbolic link loop, expected an H artifact .npz"
            raise CnnbalError(msg) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise CnnbalError(f"{path}: permission denied") from None
        if exc.errno == errno.ENOENT and path.is_symlink():
            raise CnnbalError(f"{path}: a symbolic link to nothing (dangling)") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise CnnbalError(f"{path}: no such file") from None
        raise CnnbalError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise CnnbalError(f"{path}: is a directory, expected an H artifact .npz")
    if not stat.S_ISREG(mode):
        raise CnnbalError(f"{path}: not a regular file, expected an H artifact .npz")


def _read_archive(archive: zipfile.ZipFile, name: str) -> Artifact:
    members = _list_members(archive, name)
    reader = _MemberReader(archive, members, name)
    if "format" not in members or reader.scalar("format", _STR) != FORMAT_NAME:
        raise CnnbalError(f"{name}: not a cnnbal H artifact (no 'format: {FORMAT_NAME}')")
    if "format_version" not in members:
        raise CnnbalError(f"{name}: corrupt H artifact, missing format_version")
    version = int(reader.scalar("format_version", _INT))
    if version > FORMAT_VERSION:
        raise CnnbalError(
            f"{name}: artifact format version {version} is newer than this cnnbal "
            f"({__version__}) understands (version {FORMAT_VERSION}); upgrade cnnbal"
        )
    if version < 1:
        raise CnnbalError(f"{name}: corrupt H artifact, format_version {version}")
    if version == 1:
        kind, kind_members = "affine", _V1_MEMBERS
    else:
        if "kind" not in members:
            raise CnnbalError(f"{name}: corrupt H artifact, missing kind")
        kind = str(reader.scalar("kind", _STR))
        if kind not in _KIND_MEMBERS:
            raise CnnbalError(
                f"{name}: unknown correction kind {kind!r} (this cnnbal knows "
                f"{', '.join(_KIND_MEMBERS)})"
            )
        kind_members = _KIND_MEMBERS[kind]
    schema = {**_METADATA, **kind_members}
    if version >= 2:
        schema["kind"] = (_STR, ())
    unknown = sorted(set(members) - set(schema))
    if unknown:
        raise CnnbalError(f"{name}: corrupt H artifact, unknown member {unknown[0]!r}")
    missing = [m for m in (*_REQUIRED_METADATA, *kind_members) if m not in members]
    if missing:
        raise CnnbalError(f"{name}: corrupt H artifact, missing {', '.join(missing)}")
    reader.schema = schema

    k = int(reader.scalar("n_classes", _INT))
    if k < 2:
        raise CnnbalError(f"{name}: corrupt H artifact, {k} classes (at least 2 are needed)")
    reader.n_classes = k
    arrays = {m: reader.array(m) for m in kind_members}
    correction = _correction(kind, arrays, version, name)
    accuracy = reader.array("val_class_accuracy").astype(np.float64)
    counts = reader.array("val_class_counts").astype(np.int64)
    if np.any((accuracy < 0) | (accuracy > 1)):
        raise CnnbalError(f"{name}: corrupt H artifact, val_class_accuracy outside [0, 1]")
    if np.any(counts < 0):
        raise CnnbalError(f"{name}: corrupt H artifact, negative val_class_counts")
    params = _json_object(reader, "params", name)
    provenance = _json_object(reader, "provenance", name) if "provenance" in members else {}
    names = [str(n) for n in reader.array("class_names").tolist()]
    if any(names) and len(set(names)) != len(names):
        raise CnnbalError(f"{name}: corrupt H artifact, duplicate class names")

    def optional(member: str, default, convert):
        return convert(reader.scalar(member, schema[member][0])) if member in members else default

    return Artifact(
        correction=correction,
        method=str(reader.scalar("method", _STR)),
        params=params,
        class_names=names if any(names) else None,
        val_class_accuracy=accuracy,
        val_class_counts=counts,
        n_val=optional("n_val", 0, int),
        n_competitive=optional("n_competitive", 0, int),
        input_sha256=optional("input_sha256", "", str),
        input_name=optional("input_name", "", str),
        created=optional("created", "", str),
        cnnbal_version=optional("cnnbal_version", "", str),
        format_version=version,
        provenance=provenance,
    )


def _list_members(archive: zipfile.ZipFile, name: str) -> dict[str, zipfile.ZipInfo]:
    """Member name (without ``.npy``) -> its zip entry; sizes checked, nothing read yet."""
    members: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in archive.infolist():
        if not info.filename.endswith(".npy") or "/" in info.filename:
            raise CnnbalError(
                f"{name}: corrupt H artifact, member {info.filename!r} is not a .npy array"
            )
        key = info.filename[: -len(".npy")]
        if key in members:
            raise CnnbalError(f"{name}: corrupt H artifact, member {key!r} appears twice")
        total += info.file_size
        if total > MAX_ARTIFACT_BYTES:
            raise CnnbalError(
                f"{name}: corrupt H artifact, members declare more than "
                f"{MAX_ARTIFACT_BYTES >> 20} MiB"
            )
        if (
            info.compress_type != zipfile.ZIP_STORED
            and info.file_size > _DEFLATE_FREE
            and info.file_size > _DEFLATE_RATIO * max(info.compress_size, 1)
        ):
            raise CnnbalError(
                f"{name}: corrupt H artifact, member {key!r} would inflate "
                f"{info.compress_size:,} bytes to {info.file_size:,}; refusing"
            )
        members[key] = info
    return members


class _MemberReader:
    """Reads one member at a time, checking its ``.npy`` header before its data."""

    def __init__(self, archive: zipfile.ZipFile, members: dict, name: str):
        self.archive = archive
        self.members = members
        self.name = name
        self.schema = dict(_METADATA)
        self.schema["kind"] = (_STR, ())
        self.n_classes: int | None = None

    def scalar(self, member: str, kinds: str):
        return self._read(member, kinds, ())[()]

    def array(self, member: str) -> np.ndarray:
        kinds, shape = self.schema[member]
        return self._read(member, kinds, shape)

    def _expected_shape(self, spec: tuple[str, ...]) -> tuple[int, ...]:
        k = self.n_classes
        return tuple({"K": k, "K+1": k + 1}[s] for s in spec)  # type: ignore[operator]

    def _read(self, member: str, kinds: str, spec: tuple[str, ...]) -> np.ndarray:
        where = f"{self.name}: corrupt H artifact, {member}"
        info = self.members[member]
        with self.archive.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise CnnbalError(f"{where}: unsupported .npy version {version}")
            if dtype.hasobject or dtype.kind not in kinds:
                raise CnnbalError(
                    f"{where} is {_dtype_words(dtype)}, expected {_kind_words(kinds)}"
                )
            if dtype.kind == "U" and dtype.itemsize > _MAX_STRING_BYTES:
                raise CnnbalError(f"{where} is a string of {dtype.itemsize:,} bytes; refusing")
            expected = self._expected_shape(spec)
            if tuple(shape) != expected:
                raise CnnbalError(f"{where} has shape {tuple(shape)}, expected {expected}")
            n_bytes = math.prod(shape) * dtype.itemsize
            if n_bytes > info.file_size:
                raise CnnbalError(f"{where} is truncated")
            data = fp.read(n_bytes)
        if len(data) != n_bytes:
            raise CnnbalError(f"{where} is truncated")
        order = "F" if fortran else "C"
        return np.frombuffer(data, dtype=dtype).reshape(shape, order=order).copy()


def _dtype_words(dtype: np.dtype) -> str:
    if dtype.hasobject:
        return "an object array"
    return {"U": "a string", "S": "a byte string", "b": "a boolean"}.get(
        dtype.kind, f"of type {dtype}"
    )


def _kind_words(kinds: str) -> str:
    return {_INT: "an integer", _FLOAT: "a float", _STR: "a string"}[kinds]


def _json_object(reader: _MemberReader, member: str, name: str) -> dict:
    try:
        value = json.loads(str(reader.scalar(member, _STR)))
    except ValueError:
        raise CnnbalError(f"{name}: corrupt H artifact, {member} are not JSON") from None
    if not isinstance(value, dict):
        raise CnnbalError(f"{name}: corrupt H artifact, {member} is not a JSON object")
    return value


def _correction(kind: str, arrays: dict, version: int, name: str) -> Correction:
    """Build the correction, refusing non-finite or overflowing parameters."""
    if version == 1:
        arrays = {"kind": np.array("affine"), "H": arrays["H"], "gate": arrays["apply_gate"]}
    else:
        arrays = {"kind": np.array(kind), **arrays}
    for member, value in arrays.items():
        if member == "kind":
            continue
        value = np.asarray(value, dtype=np.float64)
        shown = "apply_gate" if version == 1 and member == "gate" else member
        if member == "gate":
            if np.isnan(value) or not value > 0:
                raise CnnbalError(f"{name}: corrupt H artifact, {shown} is {float(value)}")
            continue
        if not np.all(np.isfinite(value)):
            noun = "H" if member == "H" else member
            raise CnnbalError(f"{name}: corrupt H artifact, {noun} holds NaN or inf")
        if member == "temperature":
            low, high = _TEMPERATURE_RANGE
            if not low <= float(value) <= high:
                raise CnnbalError(
                    f"{name}: corrupt H artifact, temperature {float(value):g} is outside "
                    f"[{low:g}, {high:g}]"
                )
        elif value.size and np.abs(value).max() > _MAX_PARAM_ABS:
            raise CnnbalError(
                f"{name}: corrupt H artifact, {member} holds {np.abs(value).max():.3g} "
                f"(more than {_MAX_PARAM_ABS:g} in magnitude: not a plausible correction)"
            )
    try:
        return Correction.from_arrays(arrays)
    except CnnbalError as exc:
        raise CnnbalError(f"{name}: corrupt H artifact, {exc}") from None
