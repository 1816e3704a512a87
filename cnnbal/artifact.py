"""The H artifact: a small, self-describing ``.npz`` that plain numpy can read.

Every entry is a plain array (numbers or unicode strings), so
``numpy.load(path, allow_pickle=False)`` opens it without cnnbal:

========================  ====================================================
``H``                     (K, K+1) float64, the correction ``[W b]``
``format``                ``"cnnbal-h"`` (tells a foreign .npz apart)
``format_version``        int; a newer version than this cnnbal knows is refused
``cnnbal_version``        the version that wrote it
``method``                ``"elaborated"`` / ``"naive"`` (later methods share the format)
``params``                JSON object of the method's parameters
``apply_gate``            float: correct only outputs whose max is below it (inf: all)
``n_classes``             int K
``class_names``           (K,) str (empty strings when unknown)
``val_class_accuracy``    (K,) float64 raw per-class validation accuracy (NaN: no samples)
``val_class_counts``      (K,) int64
``n_val``                 validation samples; ``n_competitive`` those in the competitive set
``input_sha256``          SHA-256 of the validation file's bytes; ``input_name`` its name
``created``               ISO 8601 UTC time of the fit
``provenance``            JSON object: how it was made (e.g. the sweep that chose the parameters)
========================  ====================================================
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cnnbal import __version__
from cnnbal.core import FitParams, FitResult
from cnnbal.errors import CnnbalError
from cnnbal.io import atomic_output

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Artifact", "load_artifact", "save_artifact"]

FORMAT_NAME = "cnnbal-h"
FORMAT_VERSION = 1
_REQUIRED = (
    "H",
    "format",
    "format_version",
    "method",
    "params",
    "apply_gate",
    "n_classes",
    "class_names",
    "val_class_accuracy",
    "val_class_counts",
)


@dataclass(frozen=True)
class Artifact:
    """A loaded (or to-be-saved) H artifact; see the module docstring for the fields."""

    H: np.ndarray
    method: str
    params: dict
    apply_gate: float
    class_names: list[str] | None
    val_class_accuracy: np.ndarray
    val_class_counts: np.ndarray
    n_val: int
    n_competitive: int
    input_sha256: str = ""
    input_name: str = ""
    created: str = ""
    cnnbal_version: str = __version__
    format_version: int = FORMAT_VERSION
    provenance: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return int(self.H.shape[0])

    @property
    def fit_params(self) -> FitParams | None:
        """The parameters as :class:`FitParams` (None for a method without them)."""
        if self.method != "elaborated":
            return None
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
        """Wrap a :class:`~cnnbal.core.FitResult` with what the file records about its origin."""
        return cls(
            H=np.asarray(result.H, dtype=np.float64),
            method=result.method,
            params=result.params.as_dict() if result.params is not None else {},
            apply_gate=float(result.apply_gate),
            class_names=list(class_names) if class_names is not None else None,
            val_class_accuracy=np.asarray(result.class_accuracy, dtype=np.float64),
            val_class_counts=np.asarray(result.class_counts, dtype=np.int64),
            n_val=int(result.n_samples),
            n_competitive=int(result.n_competitive),
            input_sha256=input_sha256,
            input_name=input_name,
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            provenance=dict(provenance or {}),
        )

    def describe(self) -> dict:
        """A JSON-ready summary (everything but the matrix itself)."""
        acc = self.val_class_accuracy
        finite = acc[np.isfinite(acc)]
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "cnnbal_version": self.cnnbal_version,
            "method": self.method,
            "params": self.params,
            "apply_gate": self.apply_gate,
            "n_classes": self.n_classes,
            "class_names": self.class_names,
            "n_val": self.n_val,
            "n_competitive": self.n_competitive,
            "val_accuracy_min": float(finite.min()) if finite.size else None,
            "val_accuracy_max": float(finite.max()) if finite.size else None,
            "input_name": self.input_name,
            "input_sha256": self.input_sha256,
            "created": self.created,
            "h_max_abs": float(np.abs(self.H).max()),
            "h_distance_from_identity": float(
                np.linalg.norm(
                    self.H - np.hstack([np.eye(self.n_classes), np.zeros((self.n_classes, 1))])
                )
            ),
            "provenance": self.provenance,
        }


def save_artifact(path: str | os.PathLike, artifact: Artifact) -> Path:
    """Write ``artifact`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    k = artifact.n_classes
    names = artifact.class_names if artifact.class_names is not None else [""] * k
    arrays = {
        "H": np.asarray(artifact.H, dtype=np.float64),
        "format": np.array(FORMAT_NAME),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "cnnbal_version": np.array(artifact.cnnbal_version),
        "method": np.array(artifact.method),
        "params": np.array(json.dumps(artifact.params, sort_keys=True)),
        "apply_gate": np.array(artifact.apply_gate, dtype=np.float64),
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
    with atomic_output(path, suffixes=(".npz",)) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and check an H artifact.

    Raises
    ------
    CnnbalError
        Missing or unreadable file, not a cnnbal artifact, a newer format, or
        inconsistent contents (shapes, non-finite H).
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise CnnbalError(f"{path}: no such file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":  # every .npz is a zip archive
        raise CnnbalError(f"{name}: not a cnnbal H artifact (not an .npz file)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CnnbalError(f"{name}: not a cnnbal H artifact (a .npy array, not an .npz)")
        with loaded as archive:
            keys = set(archive.files)
            if "format" not in keys or str(archive["format"]) != FORMAT_NAME:
                raise CnnbalError(f"{name}: not a cnnbal H artifact (no 'format: {FORMAT_NAME}')")
            version = int(archive["format_version"])
            if version > FORMAT_VERSION:
                raise CnnbalError(
                    f"{name}: artifact format version {version} is newer than this cnnbal "
                    f"({__version__}) understands (version {FORMAT_VERSION}); upgrade cnnbal"
                )
            missing = [k for k in _REQUIRED if k not in keys]
            if missing:
                raise CnnbalError(f"{name}: corrupt H artifact, missing {', '.join(missing)}")
            data = {k: archive[k] for k in keys}
    except CnnbalError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CnnbalError(f"{name}: not a readable H artifact ({exc})") from None

    H = data["H"]
    k = int(data["n_classes"])
    if H.ndim != 2 or H.shape != (k, k + 1) or H.dtype.kind != "f":
        raise CnnbalError(
            f"{name}: corrupt H artifact, H has shape {H.shape}, expected ({k}, {k + 1})"
        )
    if not np.all(np.isfinite(H)):
        raise CnnbalError(f"{name}: corrupt H artifact, H holds NaN or inf")
    for key in ("class_names", "val_class_accuracy", "val_class_counts"):
        if data[key].shape != (k,):
            raise CnnbalError(f"{name}: corrupt H artifact, {key} has shape {data[key].shape}")
    try:
        params = json.loads(str(data["params"]))
        provenance = json.loads(str(data.get("provenance", "{}")))
    except ValueError:
        raise CnnbalError(f"{name}: corrupt H artifact, params are not JSON") from None
    names = [str(n) for n in data["class_names"].tolist()]
    return Artifact(
        H=H.astype(np.float64),
        method=str(data["method"]),
        params=params,
        apply_gate=float(data["apply_gate"]),
        class_names=names if any(names) else None,
        val_class_accuracy=data["val_class_accuracy"].astype(np.float64),
        val_class_counts=data["val_class_counts"].astype(np.int64),
        n_val=int(data.get("n_val", 0)),
        n_competitive=int(data.get("n_competitive", 0)),
        input_sha256=str(data.get("input_sha256", "")),
        input_name=str(data.get("input_name", "")),
        created=str(data.get("created", "")),
        cnnbal_version=str(data.get("cnnbal_version", "")),
        format_version=version,
        provenance=provenance,
    )
