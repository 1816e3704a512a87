"""Mergeable statistics: fit and evaluate over data that never sits in one place.

Every statistic here is built from one block of rows (``from_chunk``), combined
with another of its kind (``merge``: plain sums, so associative and
commutative: any order, any tree of partial results gives the same answer) and
turned into the final result once (``finish``). Nothing here reads files or
knows about engines: cnnbal's own pipeline streams shards through them
(``cnnbal.pipeline.fit_dataset`` / ``evaluate_dataset``), and a Spark
``mapInArrow`` or Ray Data ``map_batches`` job can call the same methods on
its own record batches and reduce the results (README, "Mergeable statistics").

The fit needs the per-class accuracies before the weighted system (the weight
of a sample is ``acc_{c_n} ** -beta``, docs/method.md section 3), so it takes two passes:

1. :class:`ClassCountStats` per block, merged: samples and correct predictions
   per class; :meth:`ClassCountStats.class_weight_sq` gives the weights.
2. :class:`NormalEquationStats` per block with those weights, merged: the
   sample rows' share of the (K+1)-square normal equations.
   :meth:`FitStats.finish` adds the identity padding rows and solves.

The naive fit has no weights: both statistics come from one pass.

:class:`EvalStats` holds what every metric of :func:`cnnbal.metrics.compare`
is derived from: raw and corrected confusion matrices, the squared-error sums
(exact integers, so the total does not depend on how rows were split) and the
changed-prediction counts.

Sizes (K classes): ``ClassCountStats`` 2K integers, ``NormalEquationStats``
``(2K+1)(K+1)`` floats (K = 1,000: 16 MB), ``EvalStats`` ``2 K^2`` integers
(K = 1,000: 16 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnbal.core import (
    DEFAULT_PARAMS,
    METHODS,
    FitParams,
    FitResult,
    _as_float64_rows,
    _competitive_rows,
    _sample_system,
    apply_correction,
    argmax_rows,
    elaborated_class_weight_sq,
    finish_elaborated,
    finish_naive,
)
from cnnbal.metrics import (
    Comparison,
    comparison_from_counts,
    confusion_matrix,
    exact_sum,
    exact_to_float,
    squared_error_rows,
)

__all__ = [
    "ClassCountStats",
    "EvalStats",
    "FitStats",
    "NormalEquationStats",
    "merge_stats",
]


def merge_stats(a, b):
    """``a.merge(b)``: a module-level function for engines that want one (picklable)."""
    return a.merge(b)


def _labels(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True)
class ClassCountStats:
    """Per-class sample and correct-prediction counts (the fit's first pass).

    Attributes
    ----------
    counts : ndarray of shape (n_classes,), int64
        Samples of each true class.
    correct : ndarray of shape (n_classes,), int64
        Samples of each class whose argmax is that class.
    """

    counts: np.ndarray
    correct: np.ndarray

    @property
    def n_classes(self) -> int:
        return len(self.counts)

    @property
    def n_samples(self) -> int:
        return int(self.counts.sum())

    @classmethod
    def empty(cls, n_classes: int) -> ClassCountStats:
        """The neutral element of :meth:`merge`."""
        zeros = np.zeros(n_classes, dtype=np.int64)
        return cls(zeros, zeros.copy())

    @classmethod
    def from_chunk(
        cls, probs: np.ndarray, labels: np.ndarray, n_classes: int | None = None
    ) -> ClassCountStats:
        """Counts of one block.

        Parameters
        ----------
        probs : ndarray of shape (n_rows, n_classes)
            Validated probabilities (any memory layout).
        labels : ndarray of shape (n_rows,), int
        n_classes : int, optional
            Defaults to ``probs.shape[1]``.
        """
        n_classes = probs.shape[1] if n_classes is None else n_classes
        labels = _labels(labels)
        pred = argmax_rows(probs)
        counts = np.bincount(labels, minlength=n_classes).astype(np.int64)
        correct = np.bincount(labels[pred == labels], minlength=n_classes).astype(np.int64)
        return cls(counts, correct)

    def merge(self, other: ClassCountStats) -> ClassCountStats:
        """The counts of both blocks (element-wise sums)."""
        return ClassCountStats(self.counts + other.counts, self.correct + other.correct)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """``(accuracy, counts)`` as :func:`cnnbal.core.class_accuracy` gives them.

        Returns
        -------
        accuracy : ndarray of shape (n_classes,), float64
            NaN for a class without samples.
        counts : ndarray of shape (n_classes,), int64
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(self.counts > 0, self.correct / np.maximum(self.counts, 1), np.nan)
        return accuracy, self.counts

    def class_weight_sq(self, params: FitParams = DEFAULT_PARAMS) -> np.ndarray:
        """Squared class weights ``s_k^2`` for the second pass, shape (n_classes,).

        ``max(acc_k, 0.5 / n_k) ** (-2 beta)``: a class with zero accuracy is
        floored at half a correct sample (docs/method.md section 3, edge cases).
        """
        accuracy, counts = self.finish()
        return elaborated_class_weight_sq(accuracy, counts, params.beta)


@dataclass(frozen=True)
class NormalEquationStats:
    """The sample rows' share of the fit's normal equations (the second pass).

    For the elaborated fit, over the competitive rows with weights
    ``s_n^2 = class_weight_sq[c_n]``; for the naive fit, over all rows,
    unweighted. Rows are renormalised to sum to 1 in float64 first (as the
    in-memory fit does). The identity padding rows are NOT included: they are
    added once, in :meth:`FitStats.finish`, so blocks can be summed.

    Attributes
    ----------
    gram : ndarray of shape (n_classes + 1, n_classes + 1), float64
        ``sum_n s_n^2 pbar_n pbar_n^T``.
    rhs : ndarray of shape (n_classes, n_classes + 1), float64
        ``sum_n s_n^2 e_{c_n} pbar_n^T``.
    n_rows : int
        Rows that entered the sums (the competitive rows, or all).
    method : {"elaborated", "naive"}
    """

    gram: np.ndarray
    rhs: np.ndarray
    n_rows: int
    method: str

    @property
    def n_classes(self) -> int:
        return self.rhs.shape[0]

    @classmethod
    def empty(cls, n_classes: int, method: str = "elaborated") -> NormalEquationStats:
        """The neutral element of :meth:`merge`."""
        return cls(
            np.zeros((n_classes + 1, n_classes + 1)),
            np.zeros((n_classes, n_classes + 1)),
            0,
            method,
        )

    @classmethod
    def from_chunk(
        cls,
        probs: np.ndarray,
        labels: np.ndarray,
        *,
        method: str = "elaborated",
        params: FitParams = DEFAULT_PARAMS,
        class_weight_sq: np.ndarray | None = None,
        n_classes: int | None = None,
    ) -> NormalEquationStats:
        """The sums of one block.

        Parameters
        ----------
        probs : ndarray of shape (n_rows, n_classes)
            Validated probabilities (any memory layout, float32 or float64).
        labels : ndarray of shape (n_rows,), int
        method : {"elaborated", "naive"}
        params : FitParams
            Elaborated: ``r_low``/``r_high`` choose the competitive rows.
        class_weight_sq : ndarray of shape (n_classes,)
            Elaborated (required): :meth:`ClassCountStats.class_weight_sq` of
            the merged first pass. Ignored by the naive fit.
        n_classes : int, optional
            Defaults to ``probs.shape[1]``.
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        n_classes = probs.shape[1] if n_classes is None else n_classes
        labels = _labels(labels)
        if method == "naive":
            rows, row_labels, weights = _as_float64_rows(probs), labels, None
        else:
            if class_weight_sq is None:
                raise ValueError("the elaborated fit needs class_weight_sq from the first pass")
            rows, row_labels = _competitive_rows(probs, labels, params.r_low, params.r_high)
            weights = np.asarray(class_weight_sq, dtype=np.float64)
        gram, rhs = _sample_system(rows, row_labels, weights, n_classes, overwrite=True)
        return cls(gram, rhs, len(row_labels), method)

    def merge(self, other: NormalEquationStats) -> NormalEquationStats:
        """The sums of both blocks."""
        if other.method != self.method:
            raise ValueError(f"cannot merge {self.method} and {other.method} statistics")
        return NormalEquationStats(
            self.gram + other.gram, self.rhs + other.rhs, self.n_rows + other.n_rows, self.method
        )


@dataclass(frozen=True)
class FitStats:
    """Both passes of a fit, ready to solve.

    Attributes
    ----------
    counts : ClassCountStats
        Merged first pass (all validation rows).
    system : NormalEquationStats
        Merged second pass.
    """

    counts: ClassCountStats
    system: NormalEquationStats

    def merge(self, other: FitStats) -> FitStats:
        """Both pairs summed (for a one-pass naive fit, where both come together)."""
        return FitStats(self.counts.merge(other.counts), self.system.merge(other.system))

    def finish(self, params: FitParams = DEFAULT_PARAMS) -> FitResult:
        """Solve for H: the same :class:`~cnnbal.core.FitResult` as the in-memory fit.

        Parameters
        ----------
        params : FitParams
            The parameters the second pass used (elaborated; ignored by naive).

        Returns
        -------
        FitResult
            Python warnings are emitted for the fit's notes, as by
            :func:`cnnbal.core.fit`.
        """
        accuracy, counts = self.counts.finish()
        if self.system.method == "naive":
            return finish_naive(accuracy, counts, self.system.gram.copy(), self.system.rhs)
        system = self.system
        if system.n_rows == 0:
            return finish_elaborated(accuracy, counts, None, None, 0, params)
        return finish_elaborated(
            accuracy, counts, system.gram.copy(), system.rhs.copy(), system.n_rows, params
        )


@dataclass(frozen=True)
class EvalStats:
    """Everything :func:`cnnbal.metrics.compare` needs, as sums.

    Attributes
    ----------
    confusion_raw, confusion_corrected : ndarray of shape (n_classes, n_classes), int64
        ``[true, predicted]`` counts before and after correction.
    squared_error_raw, squared_error_corrected : int
        Exact sums of ``||p_n - e_{c_n}||^2`` in units of ``2**-1126``
        (:func:`cnnbal.metrics.exact_sum`): integers, so blocks add up to the
        same total in any order.
    fixed, broken, other : int
        Predictions changed wrong -> right, right -> wrong, wrong -> another wrong.
    """

    confusion_raw: np.ndarray
    confusion_corrected: np.ndarray
    squared_error_raw: int
    squared_error_corrected: int
    fixed: int
    broken: int
    other: int

    @property
    def n_classes(self) -> int:
        return self.confusion_raw.shape[0]

    @property
    def n_samples(self) -> int:
        return int(self.confusion_raw.sum())

    @classmethod
    def empty(cls, n_classes: int) -> EvalStats:
        """The neutral element of :meth:`merge`."""
        zeros = np.zeros((n_classes, n_classes), dtype=np.int64)
        return cls(zeros, zeros.copy(), 0, 0, 0, 0, 0)

    @classmethod
    def from_chunk(
        cls,
        raw: np.ndarray,
        corrected: np.ndarray,
        labels: np.ndarray,
        n_classes: int | None = None,
    ) -> EvalStats:
        """The sums of one block of raw and corrected outputs.

        Parameters
        ----------
        raw, corrected : ndarray of shape (n_rows, n_classes)
            Any memory layout; ``corrected`` is ``raw`` itself for a raw-only
            evaluation.
        labels : ndarray of shape (n_rows,), int
        n_classes : int, optional
            Defaults to ``raw.shape[1]``.
        """
        n_classes = raw.shape[1] if n_classes is None else n_classes
        labels = _labels(labels)
        pred_raw = argmax_rows(raw)
        squared_raw = squared_error_rows(raw, labels)
        if corrected is raw:
            return cls._from_rows(labels, n_classes, pred_raw, squared_raw)
        return cls._from_rows(
            labels,
            n_classes,
            pred_raw,
            squared_raw,
            argmax_rows(corrected),
            squared_error_rows(corrected, labels),
        )

    @classmethod
    def _from_rows(
        cls,
        labels: np.ndarray,
        n_classes: int,
        pred_raw: np.ndarray,
        squared_raw: np.ndarray,
        pred_new: np.ndarray | None = None,
        squared_new: np.ndarray | None = None,
    ) -> EvalStats:
        """The sums from per-row predictions and squared errors (None: raw only)."""
        confusion_raw = confusion_matrix(pred_raw, labels, n_classes)
        total_raw = exact_sum(squared_raw)
        if pred_new is None:
            return cls(confusion_raw, confusion_raw.copy(), total_raw, total_raw, 0, 0, 0)
        right_before = pred_raw == labels
        right_after = pred_new == labels
        return cls(
            confusion_raw,
            confusion_matrix(pred_new, labels, n_classes),
            total_raw,
            exact_sum(squared_new),
            int(np.count_nonzero(~right_before & right_after)),
            int(np.count_nonzero(right_before & ~right_after)),
            int(np.count_nonzero(~right_before & ~right_after & (pred_raw != pred_new))),
        )

    @classmethod
    def from_outputs(
        cls,
        probs: np.ndarray,
        labels: np.ndarray,
        H: np.ndarray | None = None,
        apply_gate: float = float("inf"),
    ) -> EvalStats:
        """:meth:`from_chunk` of a block and its correction by ``H`` (None: raw only).

        Parameters
        ----------
        probs : ndarray of shape (n_rows, n_classes)
        labels : ndarray of shape (n_rows,), int
        H : ndarray of shape (n_classes, n_classes + 1), optional
        apply_gate : float
            The artifact's gate (docs/method.md section 4).
        """
        if H is None:
            return cls.from_chunk(probs, probs, labels)
        labels = _labels(labels)
        n_classes = probs.shape[1]
        below = probs.max(axis=1) < apply_gate
        if below.all():
            return cls.from_chunk(probs, apply_correction(H, probs, apply_gate), labels)
        # Rows at or above the gate come out of the correction unchanged: their
        # prediction and squared error are the raw ones, so only the rows below
        # it are corrected (each row's result does not depend on the others).
        pred_raw = argmax_rows(probs)
        squared_raw = squared_error_rows(probs, labels)
        pred_new, squared_new = pred_raw.copy(), squared_raw.copy()
        if below.any():
            corrected = apply_correction(H, probs[below])
            pred_new[below] = argmax_rows(corrected)
            squared_new[below] = squared_error_rows(corrected, labels[below])
        return cls._from_rows(labels, n_classes, pred_raw, squared_raw, pred_new, squared_new)

    def merge(self, other: EvalStats) -> EvalStats:
        """The sums of both blocks."""
        return EvalStats(
            self.confusion_raw + other.confusion_raw,
            self.confusion_corrected + other.confusion_corrected,
            self.squared_error_raw + other.squared_error_raw,
            self.squared_error_corrected + other.squared_error_corrected,
            self.fixed + other.fixed,
            self.broken + other.broken,
            self.other + other.other,
        )

    def finish(self, val_class_accuracy: np.ndarray | None = None) -> Comparison:
        """Every metric of :func:`cnnbal.metrics.compare`, from the sums.

        Parameters
        ----------
        val_class_accuracy : ndarray of shape (n_classes,), optional
            Validation per-class accuracy (stored in H) for ``low20_val_accuracy``.

        Returns
        -------
        Comparison
        """
        return comparison_from_counts(
            self.confusion_raw,
            self.confusion_corrected,
            exact_to_float(self.squared_error_raw),
            exact_to_float(self.squared_error_corrected),
            {"fixed": self.fixed, "broken": self.broken, "other": self.other},
            val_class_accuracy=val_class_accuracy,
        )
