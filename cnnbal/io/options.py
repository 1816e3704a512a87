"""Options, constants and the validated-outputs container shared by the io modules."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    pass

#: Rows must sum to 1 within this (float32 softmax outputs, even through fp16/bf16
#: casts, stay well inside; logits or unnormalised scores are far outside).
ROW_SUM_TOLERANCE = 1e-3
#: Parquet schema metadata key holding the class names as a JSON list.
CLASS_NAMES_KEY = b"cnnbal.class_names"
#: Where ``apply`` records the SHA-256 of the H it applied: parquet schema metadata key,
#: ``.npz`` member, and the key of the JSON sidecar ``OUTPUT.cnnbal.json`` (``.npy``/CSV).
H_SHA256_KEY = b"cnnbal.h_sha256"
H_SHA256_MEMBER = "cnnbal_h_sha256"
SIDECAR_SUFFIX = ".cnnbal.json"

PROB_KEYS = ("probs", "predictions")
LOGIT_KEYS = ("logits",)
LABEL_KEYS = ("labels", "ground_truth", "targets")
LABEL_COLUMNS = ("label", "labels")
DEFAULT_PREFIXES = (("p_", False), ("logit_", True))
SUFFIXES = (".npz", ".npy", ".parquet", ".pq", ".csv")
#: Rows per chunk when streaming (apply) or validating large arrays.
CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class ReadOptions:
    """How to interpret an outputs file (the CLI's reading flags).

    Attributes
    ----------
    logits : bool
        The scores are logits: apply a numerically stable softmax.
    labels_path : Path or None
        Labels for a ``.npy`` input (a 1-D integer ``.npy``).
    prob_prefix : str or None
        Table inputs: read K columns ``{prefix}0 .. {prefix}{K-1}``.
    classes_path : Path or None
        A text file with one class name per line (overrides stored names).
    """

    logits: bool = False
    labels_path: Path | None = None
    prob_prefix: str | None = None
    classes_path: Path | None = None


@dataclass(frozen=True)
class Outputs:
    """Validated model outputs.

    Attributes
    ----------
    probs : ndarray of shape (n_samples, n_classes), float32 or float64
        Rows are probabilities (softmax already applied to logits).
    labels : ndarray of shape (n_samples,), int64, or None
    class_names : list of str or None
    path : Path
        Where they came from (for messages).
    """

    probs: np.ndarray
    labels: np.ndarray | None
    class_names: list[str] | None
    path: Path

    @property
    def n_samples(self) -> int:
        return int(self.probs.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.probs.shape[1])
