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
    "low_fraction_count",
    "lowest_classes",
    "summarize",
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


def _pooled_accuracy(pred: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> float:
    """Accuracy over all samples whose true class is in ``classes``."""
    member = np.isin(labels, classes)
    if not member.any():
        return float("nan")
    return float(np.mean(pred[member] == labels[member]))


def _macro_f1(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    tp = np.bincount(labels[pred == labels], minlength=n_classes).astype(float)
    true_count = np.bincount(labels, minlength=n_classes)
    pred_count = np.bincount(pred, minlength=n_classes)
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
    recall, _ = class_recall(pred, labels, n_classes)
    present = recall[np.isfinite(recall)]
    n_low = low_fraction_count(n_classes)
    worst = np.sort(present)[:n_low]
    residual = probs.astype(np.float64, copy=True)
    residual[np.arange(len(labels)), labels] -= 1.0
    return {
        "total_accuracy": float(np.mean(pred == labels)),
        "low20_accuracy": _pooled_accuracy(pred, labels, low20_classes),
        "low20_val_accuracy": (
            float("nan")
            if low20_val_classes is None
            else _pooled_accuracy(pred, labels, low20_val_classes)
        ),
        "worst20_accuracy": float(worst.mean()),
        "balanced_accuracy": float(present.mean()),
        "worst_class_accuracy": float(present.min()),
        "macro_f1": _macro_f1(pred, labels, n_classes),
        "squared_error": float(np.einsum("ij,ij->", residual, residual) / len(labels)),
    }


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

    Parameters
    ----------
    raw, corrected : ndarray of shape (n_samples, n_classes)
    labels : ndarray of shape (n_samples,), int
    val_class_accuracy : ndarray of shape (n_classes,), optional
        Validation per-class accuracy (stored in H): chooses the classes of
        ``low20_val_accuracy``.
    """
    n_classes = raw.shape[1]
    n_low = low_fraction_count(n_classes)
    pred_raw = raw.argmax(axis=1)
    pred_new = corrected.argmax(axis=1)
    recall_raw, counts = class_recall(pred_raw, labels, n_classes)
    recall_new, _ = class_recall(pred_new, labels, n_classes)
    low20 = lowest_classes(recall_raw, n_low)
    low20_val = None
    if val_class_accuracy is not None:
        # only classes present in this evaluation set can be measured
        val_scores = np.where(counts > 0, val_class_accuracy, np.nan)
        low20_val = lowest_classes(val_scores, n_low)
    before = summarize(raw, labels, low20_classes=low20, low20_val_classes=low20_val)
    after = summarize(corrected, labels, low20_classes=low20, low20_val_classes=low20_val)
    right_before = pred_raw == labels
    right_after = pred_new == labels
    changed = {
        "fixed": int(np.sum(~right_before & right_after)),
        "broken": int(np.sum(right_before & ~right_after)),
        "other": int(np.sum(~right_before & ~right_after & (pred_raw != pred_new))),
    }
    return Comparison(
        metrics={name: (before[name], after[name]) for name in METRIC_NAMES},
        changed=changed,
        class_recall_raw=recall_raw,
        class_recall_corrected=recall_new,
        class_counts=counts,
        low20_classes=low20,
        low20_val_classes=low20_val,
        n_samples=len(labels),
    )
