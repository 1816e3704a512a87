"""Validation of score arrays, labels and class lists: one error per kind of bad input."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnbal.errors import CnnbalError

if TYPE_CHECKING:  # pragma: no cover
    pass

from cnnbal.io.options import ROUNDED_SUM_WINDOW, ROW_SUM_TOLERANCE


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for any finite logits (the row max is subtracted)."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def validate_probs(
    values: np.ndarray,
    source: str | os.PathLike,
    *,
    logits: bool = False,
    row_offset: int = 0,
    renormalize: bool = False,
) -> np.ndarray:
    """Check a score array and return probabilities (a new array or ``values`` itself).

    :func:`check_probs` does the same and also returns how many rows were
    renormalised.
    """
    return check_probs(
        values, source, logits=logits, row_offset=row_offset, renormalize=renormalize
    )[0]


def check_probs(
    values: np.ndarray,
    source: str | os.PathLike,
    *,
    logits: bool = False,
    row_offset: int = 0,
    renormalize: bool = False,
) -> tuple[np.ndarray, int]:
    """Check a score array and return probabilities and the number of rows renormalised.

    Parameters
    ----------
    values : array-like of shape (n_samples, n_classes)
    source : str or PathLike
        Named in error messages.
    logits : bool
        ``values`` are logits: softmax them after the checks.
    row_offset : int
        Added to row numbers in messages (for chunks of a larger file), so
        they are row numbers in the file (0-based, header not counted).
    renormalize : bool
        Divide rows whose sum is off 1 by more than :data:`ROW_SUM_TOLERANCE`
        by their sum (rounded exports) instead of refusing them. Negative
        values and rows summing to 0 are still refused.

    Returns
    -------
    probs : ndarray of shape (n_samples, n_classes), float32 (float32 input) or float64
    n_renormalized : int
        Rows divided by their sum (0 unless ``renormalize``).

    Raises
    ------
    CnnbalError
        Wrong dimensions, empty, NaN/inf, negative values, rows not summing to 1.
    """
    name = Path(source).name
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise CnnbalError(
            f"{name}: expected a 2-D array (n_samples, n_classes), got shape {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise CnnbalError(f"{name}: no samples (0 rows)")
    if arr.shape[1] < 2:
        raise CnnbalError(f"{name}: need at least 2 classes, got {arr.shape[1]} column(s)")
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        raise CnnbalError(f"{name}: scores must be numbers, got dtype {arr.dtype}")
    dtype = np.float32 if arr.dtype == np.float32 else np.float64
    arr = np.asarray(arr, dtype=dtype)
    # Two reductions and no temporary array find any NaN or inf: the minimum
    # propagates NaN and sees -inf; the maximum (logits) or the row sums
    # (probabilities, needed below anyway) see +inf. The element-wise search
    # runs only to name the offending value.
    if logits:
        lowest, highest = arr.min(), arr.max()
        finite = bool(np.isfinite(lowest) and np.isfinite(highest))
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # inf sums are reported below
            lowest, sums = arr.min(), arr.sum(axis=1)
        finite = bool(np.isfinite(lowest) and np.isfinite(sums).all())
    if not finite:
        cells = np.argwhere(~np.isfinite(arr))
        if len(cells):
            row, col = cells[0]
            raise CnnbalError(
                f"{name}: non-finite value {arr[row, col]} at "
                f"{_where(name, row + row_offset)}, column {col}"
            )
        # finite values whose row sum overflows: the row-sum check names the row
    n_renormalized = 0
    if logits:
        arr = softmax(np.array(arr, dtype=dtype, copy=True))
    else:
        if lowest < 0:
            row, col = np.argwhere(arr < 0)[0]
            raise CnnbalError(
                f"{name}: negative probability {arr[row, col]:.6g} at "
                f"{_where(name, row + row_offset)}, column {col} (if these are logits, "
                "pass --logits)"
            )
        # sums in the array's own precision: float32 rounding (~1e-6 for
        # K = 10,000) is far inside the tolerance, and a float64 pass costs a cast
        # the slack absorbs float64 rounding, so a row of %.4f values summing
        # to exactly 0.999 in decimal is inside the tolerance it is printed against
        bad = np.abs(sums - 1.0) > ROW_SUM_TOLERANCE * (1 + 1e-9)
        if bad.any():
            zero = bad & (sums <= 0)
            if renormalize and not zero.any():
                if not arr.flags.writeable or arr is values:
                    arr = np.array(arr, copy=True)
                arr[bad] /= sums[bad, None]
                n_renormalized = int(bad.sum())
            else:
                raise CnnbalError(_row_sum_message(name, sums, bad, row_offset, renormalize))
    tiny = np.finfo(dtype).tiny
    # arr >= 0 here (checked above, or a softmax), so one comparison finds any
    # subnormal candidates; the exact test runs only when there are some.
    if logits:
        lowest = arr.min()
    if lowest >= tiny:  # the usual case: no zero or subnormal at all
        return arr, n_renormalized
    small = arr < tiny
    if small.any() and (subnormal := small & (arr != 0)).any():
        if not arr.flags.writeable or arr is values:
            arr = np.array(arr, copy=True)
        arr[subnormal] = 0
    return arr, n_renormalized


def _where(name: str, row: int) -> str:
    """A row number in the file; for a CSV also its line (header = line 1)."""
    if name.lower().endswith(".csv"):
        return f"row {row} (line {row + 2})"
    return f"row {row}"


def _row_sum_message(
    name: str, sums: np.ndarray, bad: np.ndarray, row_offset: int, renormalize: bool
) -> str:
    """The first bad row, its sum to enough digits to see the gap, and the fitting hint."""
    rows = np.flatnonzero(bad)
    if renormalize:  # only a row summing to 0 stops --renormalize
        rows = np.flatnonzero(bad & (sums <= 0))
    row = int(rows[0])
    total = float(sums[row])
    # enough digits that the printed sum is visibly outside the tolerance
    # (0.998874, not 0.999)
    excess = max(abs(total - 1.0) - ROW_SUM_TOLERANCE, 1e-12)
    decimals = int(np.clip(np.ceil(-np.log10(excess)) + 1, 6, 12))
    first, last = row_offset, row_offset + len(sums) - 1
    if total <= 0:
        hint = "a row of zeros cannot be renormalised; drop it or fix the export"
    elif np.all(np.abs(sums[rows] - 1.0) <= ROUNDED_SUM_WINDOW):
        hint = "rounded probabilities, e.g. written with %.4f? pass --renormalize"
    else:
        hint = "far from 1: if these are logits or unnormalised scores, pass --logits"
    return (
        f"{name}: {_where(name, row + row_offset)} sums to {total:.{decimals}g}, not 1 "
        f"(tolerance {ROW_SUM_TOLERANCE:g}); {int(bad.sum())} row(s) off in rows "
        f"{first}..{last} ({hint})"
    )


def validate_labels(
    labels: np.ndarray,
    n_samples: int,
    n_classes: int,
    source: str | os.PathLike,
) -> np.ndarray:
    """Check labels and return them as int64.

    Raises
    ------
    CnnbalError
        Not 1-D, wrong length, not integers, or out of ``[0, n_classes)``.
    """
    name = Path(source).name
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise CnnbalError(f"{name}: labels must be 1-D, got shape {arr.shape}")
    if len(arr) != n_samples:
        raise CnnbalError(f"{name}: {len(arr)} labels for {n_samples} rows of scores")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise CnnbalError(f"{name}: labels must be integers, found non-integer values")
    elif arr.dtype.kind not in "iu":
        raise CnnbalError(f"{name}: labels must be integers, got dtype {arr.dtype}")
    if len(arr) and (arr.min() < 0 or arr.max() >= n_classes):  # before an int64 cast wraps
        bad = arr[(arr < 0) | (arr >= n_classes)][0]
        bad = int(bad) if arr.dtype.kind in "iu" else f"{bad:g}"
        raise CnnbalError(
            f"{name}: label {bad} out of range for {n_classes} classes [0, {n_classes})"
        )
    arr = arr.astype(np.int64)
    if len(arr) and (arr.min() < 0 or arr.max() >= n_classes):
        bad = int(arr[(arr < 0) | (arr >= n_classes)][0])
        raise CnnbalError(
            f"{name}: label {bad} out of range for {n_classes} classes [0, {n_classes})"
        )
    return arr


def check_class_names(
    names: list[str] | None, source: str | os.PathLike, n_classes: int | None = None
) -> list[str] | None:
    """Class names must be distinct (else string labels would all go to the last
    duplicate) and, when ``n_classes`` is known, one per score column.

    Returns ``names`` unchanged; None passes through.
    """
    if names is None:
        return None
    name = Path(source).name
    seen: set[str] = set()
    repeated = [n for n in names if n in seen or seen.add(n)]
    if repeated:
        raise CnnbalError(f"{name}: duplicate class name {repeated[0]!r} in the class names")
    if n_classes is not None and len(names) != n_classes:
        raise CnnbalError(f"{name}: {len(names)} class names for {n_classes} score columns")
    return names


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name per line (blank lines at the end ignored)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CnnbalError(f"{path.name}: cannot read class list: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CnnbalError(f"{path.name}: class list is not UTF-8 text") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise CnnbalError(f"{path.name}: class list is empty")
    if len(set(names)) != len(names):
        first = next(n for i, n in enumerate(names) if n in names[:i])
        raise CnnbalError(f"{path.name}: class list has duplicate names ({first!r})")
    return names
