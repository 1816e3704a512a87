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
#: A row sum within this of 1 looks like a rounded export (a ``%.4f`` export of
#: K = 1,000 classes is off by at most 0.05): the error suggests --renormalize;
#: further off, the scores are more likely logits and it suggests --logits.
ROUNDED_SUM_WINDOW = 0.1
#: CSV delimiters recognised when none is given (the header line decides).
CSV_DELIMITERS = (",", ";", "\t", "|")
#: Parquet schema metadata key holding the class names as a JSON list.
CLASS_NAMES_KEY = b"cnnbal.class_names"

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
    renormalize : bool
        Rows whose sum is off 1 by more than :data:`ROW_SUM_TOLERANCE` (rounded
        exports such as ``%.4f``) are divided by their sum instead of refused;
        the count is reported (``Outputs.n_renormalized``, ``Chunk.n_renormalized``).
    label_column : str or None
        Tables: the label column (default ``label``, else ``labels``);
        ``.npz``: the label array's key.
    score_column : str or None
        Tables: a list column of that name, or K columns ``{name}0 ..
        {name}{K-1}`` (a prefix); ``.npz``: the score array's key.
    delimiter : str or None
        CSV field separator (default: detected from the header line among
        :data:`CSV_DELIMITERS`).
    fallback_class_names : tuple of str or None
        Names to use when the file and ``classes_path`` give none (e.g. the
        names stored in H), so string labels can be read.
    """

    logits: bool = False
    labels_path: Path | None = None
    prob_prefix: str | None = None
    classes_path: Path | None = None
    renormalize: bool = False
    label_column: str | None = None
    score_column: str | None = None
    delimiter: str | None = None
    fallback_class_names: tuple[str, ...] | None = None


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
    n_renormalized : int
        Rows divided by their sum (``ReadOptions.renormalize``).
    """

    probs: np.ndarray
    labels: np.ndarray | None
    class_names: list[str] | None
    path: Path
    n_renormalized: int = 0

    @property
    def n_samples(self) -> int:
        return int(self.probs.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.probs.shape[1])
