"""Metrics of docs/method.md section 5: pure functions of predictions and labels.

The paper's "low-20% accuracy" picks the ``round(0.2 K)`` classes with the
lowest RAW accuracy on the evaluation set and re-measures those same classes
after correction. That choice is biased (regression to the mean: any
perturbation looks like a gain), so it is never reported alone:

- ``low20_val_accuracy`` picks the classes by the VALIDATION accuracies stored
  in H, so the evaluation set plays no part in the choice;
- ``worst20_accuracy`` is the mean accuracy of whichever classes are worst for
  each set of predictions (recomputed after correction);
- ``balanced_accuracy`` (mean per-class recall), ``worst_class_accuracy`` and
  ``macro_f1`` complete the picture.

All accuracies are fractions in [0, 1]. Classes with no evaluation samples are
left out of per-class summaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "METRIC_NAMES",
    "Comparison",
    "class_recall",
    "compare",
    "comparison_from_counts",
    "confusion_matrix",
    "exact_sum",
    "exact_to_float",
    "low_fraction_count",
    "lowest_classes",
    "squared_error_rows",
    "summarize",
    "summary_from_counts",
]

#: The metrics of :func:`summarize`, in report order.
METRIC_NAMES = (
    "total_accuracy",
    "low20_accuracy",
    "low20_val_accuracy",
    "worst20_accuracy",
    "balanced_accuracy",
    "worst_class_accuracy",
    "macro_f1",
    "squared_error",
)


def low_fraction_count(n_classes: int, fraction: float = 0.2) -> int:
    """``round(fraction * K)`` with halves rounded up, at least 1 (K=10 -> 2, K=100 -> 20)."""
    return max(1, int(np.floor(fraction * n_classes + 0.5)))


def class_recall(
    pred: np.ndarray, labels: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class accuracy (recall) and counts.

    Returns
    -------
    recall : ndarray of shape (n_classes,)
        NaN for classes with no samples.
    counts : ndarray of shape (n_classes,), int64
    """
    counts = np.bincount(labels, minlength=n_classes)
    correct = np.bincount(labels[pred == labels], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)
    return recall, counts


def lowest_classes(class_scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` lowest finite scores (ties broken by class index)."""
    finite = np.flatnonzero(np.isfinite(class_scores))
    order = finite[np.argsort(class_scores[finite], kind="stable")]
    return np.sort(order[:n])


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``C[true, predicted]``, shape (n_classes, n_classes), int64."""
    flat = labels.astype(np.int64) * n_classes + pred
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def squared_error_rows(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``||p_n - e_{c_n}||^2`` per row in float64, shape (n_samples,).

    Computed as ``||p_n||^2 - 2 p_n[c_n] + 1`` with each row converted to
    float64 (exact for float32 input) and its dot product taken on its own:
    the value of a row does not depend on the block it was read in or on the
    input's layout, so the total of :func:`exact_sum` is the same for any
    chunking. Rows go through a small reused float64 buffer (a few hundred KB,
    in cache) instead of one float64 copy of the whole input.
    """
    n_rows, n_classes = probs.shape
    squared = np.empty(n_rows)
    step = max(1, _SQUARED_BLOCK // max(n_classes, 1))
    buffer = np.empty((min(step, n_rows), n_classes))
    for start in range(0, n_rows, step):
        block = buffer[: min(step, n_rows - start)]
        np.copyto(block, probs[start : start + len(block)])
        np.einsum("ij,ij->i", block, block, out=squared[start : start + len(block)])
    squared -= 2.0 * probs[np.arange(n_rows), labels].astype(np.float64)
    squared += 1.0
    return squared


#: float64 values per block of :func:`squared_error_rows` (256 KB).
_SQUARED_BLOCK = 1 << 15


#: A finite double is an integer multiple of 2**-1126 at the precision frexp gives
#: (53-bit mantissa, exponent >= -1073): exact sums are kept as integers in that unit.
_EXACT_SHIFT = 1126
_EXACT_BLOCK = 1 << 24


def exact_sum(values: np.ndarray) -> int:
    """The exact sum of non-negative finite float64 values, in units of ``2**-1126``.

    Integers add exactly and in any order, so partial sums of chunks merge to
    the same total however the data was split; :func:`exact_to_float` rounds it
    once at the end. Vectorised: mantissas are split in 26-bit halves and
    summed per binary exponent (exact in float64 up to 2**26 values per
    block), then shifted into one Python integer.
    """
    total = 0
    values = np.asarray(values, dtype=np.float64).ravel()
    for start in range(0, len(values), _EXACT_BLOCK):
        mant, expo = np.frexp(values[start : start + _EXACT_BLOCK])
        mant = (mant * 2.0**53).astype(np.int64)
        lowest = int(expo.min()) if len(expo) else 0
        index = expo - lowest
        high = np.bincount(index, weights=mant >> 26)
        low = np.bincount(index, weights=mant & ((1 << 26) - 1))
        for i in np.flatnonzero((high != 0) | (low != 0)):
            shift = int(i) + lowest - 53 + _EXACT_SHIFT
            total += ((int(high[i]) << 26) + int(low[i])) << shift
    return total


def exact_to_float(total: int) -> float:
    """Round an :func:`exact_sum` total to the nearest float64."""
    from fractions import Fraction

    return float(Fraction(total, 1 << _EXACT_SHIFT))


def summary_from_counts(
    confusion: np.ndarray,
    squared_error: float,
    *,
    low20_classes: np.ndarray,
    low20_val_classes: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics of :data:`METRIC_NAMES` from a confusion matrix and the squared-error sum.

    The single definition of the metrics: :func:`summarize` (arrays in memory)
    and :class:`cnnbal.stats.EvalStats` (streamed, merged) both end here, so
    they agree exactly.

    Parameters
    ----------
    confusion : ndarray of shape (n_classes, n_classes), int
        ``confusion[true, predicted]`` counts.
    squared_error : float
        ``sum_n ||p_n - e_{c_n}||^2`` (not divided by the sample count).
    low20_classes, low20_val_classes : ndarray of int
        As in :func:`summarize`.
    """
    n_classes = confusion.shape[0]
    counts = confusion.sum(axis=1)
    correct = np.diagonal(confusion).copy()
    n_samples = int(counts.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)
    present = recall[np.isfinite(recall)]
    worst = np.sort(present)[: low_fraction_count(n_classes)]
    return {
        "total_accuracy": float(correct.sum() / n_samples),
        "low20_accuracy": _pooled_accuracy(correct, counts, low20_classes),
        "low20_val_accuracy": (
            float("nan")
            if low20_val_classes is None
            else _pooled_accuracy(correct, counts, low20_val_classes)
        ),
        "worst20_accuracy": float(worst.mean()),
        "balanced_accuracy": float(present.mean()),
        "worst_class_accuracy": float(present.min()),
        "macro_f1": _macro_f1(correct, counts, confusion.sum(axis=0)),
        "squared_error": float(squared_error / n_samples),
    }


def _pooled_accuracy(correct: np.ndarray, counts: np.ndarray, classes: np.ndarray) -> float:
    """Accuracy over all samples whose true class is in ``classes``."""
    members = int(counts[classes].sum())
    if members == 0:
        return float("nan")
    return float(int(correct[classes].sum()) / members)


def _macro_f1(correct: np.ndarray, true_count: np.ndarray, pred_count: np.ndarray) -> float:
    tp = correct.astype(float)
    present = true_count > 0
    denom = true_count + pred_count
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[present].mean())


def summarize(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    low20_classes: np.ndarray,
    low20_val_classes: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics of :data:`METRIC_NAMES` for one set of outputs.

    Parameters
    ----------
    probs : ndarray of shape (n_samples, n_classes)
    labels : ndarray of shape (n_samples,), int
    low20_classes : ndarray of int
        The fixed class set of the paper's low-20% (chosen on the raw outputs).
    low20_val_classes : ndarray of int, optional
        The class set chosen by validation accuracy; NaN metric when None.
    """
    n_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    return summary_from_counts(
        confusion_matrix(pred, labels, n_classes),
        exact_to_float(exact_sum(squared_error_rows(probs, labels))),
        low20_classes=low20_classes,
        low20_val_classes=low20_val_classes,
    )


@dataclass(frozen=True)
class Comparison:
    """Raw vs corrected outputs on one evaluation set.

    Attributes
    ----------
    metrics : dict of str to (float, float)
        ``name -> (raw, corrected)`` for every name in :data:`METRIC_NAMES`.
    changed : dict of str to int
        ``fixed`` (wrong -> right), ``broken`` (right -> wrong), ``other``
        (wrong -> a different wrong class): docs/method.md section 5, Figures 4/5.
    class_recall_raw, class_recall_corrected : ndarray of shape (n_classes,)
    class_counts : ndarray of shape (n_classes,)
    low20_classes : ndarray of int
        The paper's class set (lowest raw accuracy on this set).
    low20_val_classes : ndarray of int or None
        The class set chosen by validation accuracy.
    n_samples : int
    """

    metrics: dict[str, tuple[float, float]]
    changed: dict[str, int]
    class_recall_raw: np.ndarray
    class_recall_corrected: np.ndarray
    class_counts: np.ndarray
    low20_classes: np.ndarray
    low20_val_classes: np.ndarray | None
    n_samples: int


def compare(
    raw: np.ndarray,
    corrected: np.ndarray,
    labels: np.ndarray,
    *,
    val_class_accuracy: np.ndarray | None = None,
) -> Comparison:
    """Compare raw and corrected outputs (same samples, same labels).

    The in-memory form of :class:`cnnbal.stats.EvalStats`: one chunk, then
    :meth:`~cnnbal.stats.EvalStats.finish` (streamed and merged chunks give
    the same result exactly).

    Parameters
    ----------
    raw, corrected : ndarray of shape (n_samples, n_classes)
    labels : ndarray of shape (n_samples,), int
    val_class_accuracy : ndarray of shape (n_classes,), optional
        Validation per-class accuracy (stored in H): chooses the classes of
        ``low20_val_accuracy``.
    """
    from cnnbal.stats import EvalStats

    stats = EvalStats.from_chunk(raw, corrected, labels)
    return stats.finish(val_class_accuracy=val_class_accuracy)


def comparison_from_counts(
    confusion_raw: np.ndarray,
    confusion_corrected: np.ndarray,
    squared_error_raw: float,
    squared_error_corrected: float,
    changed: dict[str, int],
    *,
    val_class_accuracy: np.ndarray | None = None,
) -> Comparison:
    """A :class:`Comparison` from the sums :class:`cnnbal.stats.EvalStats` keeps.

    Parameters
    ----------
    confusion_raw, confusion_corrected : ndarray of shape (n_classes, n_classes), int
        ``[true, predicted]`` counts before and after correction.
    squared_error_raw, squared_error_corrected : float
        Sums (not means) of ``||p_n - e_{c_n}||^2``.
    changed : dict of str to int
        ``fixed``, ``broken``, ``other`` (see :class:`Comparison`).
    val_class_accuracy : ndarray of shape (n_classes,), optional
    """
    n_classes = confusion_raw.shape[0]
    n_low = low_fraction_count(n_classes)
    counts = confusion_raw.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall_raw = np.where(
            counts > 0, np.diagonal(confusion_raw) / np.maximum(counts, 1), np.nan
        )
        recall_new = np.where(
            counts > 0, np.diagonal(confusion_corrected) / np.maximum(counts, 1), np.nan
        )
    low20 = lowest_classes(recall_raw, n_low)
    low20_val = None
    if val_class_accuracy is not None:
        # only classes present in this evaluation set can be measured
        val_scores = np.where(counts > 0, val_class_accuracy, np.nan)
        low20_val = lowest_classes(val_scores, n_low)
    before = summary_from_counts(
        confusion_raw, squared_error_raw, low20_classes=low20, low20_val_classes=low20_val
    )
    after = summary_from_counts(
        confusion_corrected,
        squared_error_corrected,
        low20_classes=low20,
        low20_val_classes=low20_val,
    )
    return Comparison(
        metrics={name: (before[name], after[name]) for name in METRIC_NAMES},
        changed={key: int(changed[key]) for key in ("fixed", "broken", "other")},
        class_recall_raw=recall_raw,
        class_recall_corrected=recall_new,
        class_counts=counts,
        low20_classes=low20,
        low20_val_classes=low20_val,
        n_samples=int(counts.sum()),
    )
