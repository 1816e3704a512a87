"""Every correction method side by side, and the one to recommend, chosen on VAL only.

For each method of :data:`cnnbal.methods.METHOD_NAMES` (or a chosen subset):

1. fit it on all of VAL (:func:`cnnbal.methods.fit_method`: hyper-parameters
   not given are chosen by stratified k-fold CV on VAL);
2. estimate what it does to new data by nested cross-validation on VAL
   (:func:`cnnbal.methods.cross_validate`: each outer fold refits the method,
   its hyper-parameter choice included, on the other folds, and scores the
   held-out fold; the estimate is the mean over folds);
3. recommend the method with the best cross-validated objective among those
   whose cross-validated total accuracy stays within ``max_total_drop``
   points of raw (:func:`cnnbal.methods.recommend`, the rule of ``cnnbal
   sweep``); none when no method beats the raw outputs.

Only then, and only when TEST is given, each fitted correction is scored on
TEST: raw vs corrected metrics (:func:`cnnbal.metrics.compare`) with paired
bootstrap 95% intervals of each change (:func:`cnnbal.methods.paired_bootstrap`).
TEST never reaches steps 1-3, so the recommendation is the same with or
without it.

Pure functions: no printing, no files; randomness takes a seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cnnbal.errors import CnnbalError
from cnnbal.methods import (
    METHOD_NAMES,
    CVEstimate,
    MethodFit,
    cross_validate,
    fit_method,
    paired_bootstrap,
    recommend,
)
from cnnbal.metrics import Comparison
from cnnbal.metrics import compare as compare_outputs
from cnnbal.sweep import DEFAULT_MAX_TOTAL_DROP, OBJECTIVES, SCORE_NAMES, choose

__all__ = [
    "TEST_METRICS",
    "MethodComparison",
    "MethodResult",
    "TestResult",
    "compare_methods",
    "parse_methods",
]

#: The test metrics reported per method (keys of :func:`cnnbal.metrics.summarize`),
#: each with a paired bootstrap interval of its change.
TEST_METRICS = (
    "total_accuracy",
    "worst20_accuracy",
    "low20_val_accuracy",
    "balanced_accuracy",
    "worst_class_accuracy",
)

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TestResult:
    """One fitted method on TEST (computed after the recommendation; no influence on it).

    Attributes
    ----------
    comparison : Comparison
        Raw vs corrected metrics on TEST (``low20_val`` classes by the
        method's validation accuracies).
    intervals : dict of str to (float, float)
        Paired bootstrap interval of the change (corrected - raw) of each
        metric of :data:`TEST_METRICS`, fractions.
    n_changed : int
        TEST predictions the correction changes.
    """

    comparison: Comparison
    intervals: dict[str, tuple[float, float]]
    n_changed: int

    def change(self, metric: str) -> float:
        raw, new = self.comparison.metrics[metric]
        return new - raw


@dataclass(frozen=True)
class MethodResult:
    """What :func:`compare_methods` found for one method.

    Attributes
    ----------
    method : str
    fit : MethodFit
        Fitted on all of VAL (what ``-o`` writes when it is recommended).
    cv : CVEstimate
        Nested cross-validated raw and corrected scores on VAL (reported: their
        means over the held-out folds).
    eligible : bool
        Mean CV total accuracy at most ``max_total_drop`` points below raw.
    seconds : float
        Wall time of the fit on all of VAL plus the nested CV.
    test : TestResult or None
    """

    method: str
    fit: MethodFit
    cv: CVEstimate
    eligible: bool
    seconds: float
    test: TestResult | None = None


@dataclass(frozen=True)
class MethodComparison:
    """Every method's results and the recommendation.

    Attributes
    ----------
    results : tuple of MethodResult
        In the order the methods were given.
    recommended : str or None
        The method recommended from VAL alone; None: keep the raw outputs.
    objective : str
    max_total_drop : float
        Percentage points.
    n_folds, seed : int
    n_val, n_classes : int
    n_test : int or None
    n_boot : int
    seconds : float
        Wall time of the whole comparison (TEST scoring included).
    """

    results: tuple[MethodResult, ...]
    recommended: str | None
    objective: str
    max_total_drop: float
    n_folds: int
    seed: int
    n_val: int
    n_classes: int
    n_test: int | None
    n_boot: int
    seconds: float

    def result(self, method: str) -> MethodResult:
        for item in self.results:
            if item.method == method:
                return item
        raise KeyError(method)

    @property
    def raw_cv(self) -> dict[str, float]:
        """The raw outputs' mean scores over the held-out folds of VAL (the same folds for all)."""
        return self.results[0].cv.mean_raw

    @property
    def raw_test(self) -> dict[str, float] | None:
        """The raw outputs' metrics on TEST."""
        first = self.results[0].test
        if first is None:
            return None
        return {name: first.comparison.metrics[name][0] for name in TEST_METRICS}

    def to_dict(self) -> dict:
        """Everything as one JSON-ready object (fractions in [0, 1], times in seconds)."""
        methods = []
        for item in self.results:
            entry = {
                "method": item.method,
                "kind": item.fit.correction.kind,
                "hyper": dict(item.fit.hyper),
                "chosen_by_cv": item.fit.chosen_by_cv,
                "hyper_cv": item.fit.cv,
                "cv_estimate": {
                    "scoring": "mean over the held-out folds of a nested CV on VAL",
                    "raw": item.cv.mean_raw,
                    "corrected": item.cv.mean,
                    "change": item.cv.mean_change,
                    "pooled_change": item.cv.pooled_change,
                    "raw_fold_scores": item.cv.raw_fold_scores.tolist(),
                    "fold_scores": item.cv.fold_scores.tolist(),
                    "hyper_per_fold": list(item.cv.hyper_per_fold),
                },
                "eligible": item.eligible,
                "recommended": item.method == self.recommended,
                "fit_seconds": item.fit.fit_seconds,
                "seconds": item.seconds,
                "warnings": list(item.fit.warnings),
                "correction": item.fit.correction.as_dict(),
                "test": None,
            }
            if item.test is not None:
                entry["test"] = {
                    "metrics": {
                        name: {
                            "raw": item.test.comparison.metrics[name][0],
                            "corrected": item.test.comparison.metrics[name][1],
                            "change": item.test.change(name),
                            "ci95": list(item.test.intervals.get(name, (None, None))),
                        }
                        for name in TEST_METRICS
                    },
                    "changed": dict(item.test.comparison.changed),
                    "n_changed": item.test.n_changed,
                }
            methods.append(entry)
        return {
            "objective": self.objective,
            "max_total_drop": self.max_total_drop,
            "n_folds": self.n_folds,
            "seed": self.seed,
            "n_boot": self.n_boot,
            "n_val": self.n_val,
            "n_classes": self.n_classes,
            "n_test": self.n_test,
            "score_names": list(SCORE_NAMES),
            "raw_cv": self.raw_cv,
            "raw_test": self.raw_test,
            "recommended": self.recommended,
            "methods": methods,
            "seconds": self.seconds,
        }


def parse_methods(text: str | None) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``, every name checked (all methods when None)."""
    if text is None:
        return METHOD_NAMES
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown or not names:
        raise CnnbalError(
            f"--methods: unknown method {unknown[0] if unknown else text!r}; "
            f"choose from {', '.join(METHOD_NAMES)}"
        )
    if len(set(names)) != len(names):
        raise CnnbalError(f"--methods: a method is named twice in {text!r}")
    return names


def compare_methods(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    *,
    methods: Sequence[str] = METHOD_NAMES,
    test_probs: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    objective: str = "worst20",
    max_total_drop: float = DEFAULT_MAX_TOTAL_DROP,
    n_folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    prior: str | np.ndarray = "uniform",
    progress: ProgressCallback | None = None,
) -> MethodComparison:
    """Fit, cross-validate and (optionally) test every method; recommend one on VAL only.

    Parameters
    ----------
    val_probs : ndarray of shape (n_val, n_classes)
    val_labels : ndarray of shape (n_val,), int
    methods : sequence of str
        Names of :data:`cnnbal.methods.METHOD_NAMES`, in report order.
    test_probs : ndarray of shape (n_test, n_classes), optional
    test_labels : ndarray of shape (n_test,), int, optional
        Scored after the recommendation is made; never used for it.
    objective : {"worst20", "low20_val", "balanced", "total"}
    max_total_drop : float
        Percentage points of cross-validated total accuracy a method may lose.
    n_folds, seed : int
        The CV folds (the same for every method, so their estimates pair).
    n_boot : int
        Bootstrap resamples of TEST for the intervals.
    prior : {"uniform", "val"} or ndarray of shape (n_classes,)
        ``prior-match``'s target prior.
    progress : callable, optional
        Called as ``progress(method, index, n_methods)`` before each method.

    Returns
    -------
    MethodComparison
    """
    started = time.perf_counter()
    if objective not in OBJECTIVES:
        raise CnnbalError(
            f"--objective: unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}"
        )
    if not max_total_drop >= 0:
        raise CnnbalError(f"--max-total-drop: must be >= 0 points, got {max_total_drop}")
    if not methods:
        raise CnnbalError("--methods: no method to compare")
    if (test_probs is None) != (test_labels is None):
        raise CnnbalError("compare: test outputs need their labels")
    n_val, n_classes = val_probs.shape
    if test_probs is not None and test_probs.shape[1] != n_classes:
        raise CnnbalError(f"compare: TEST has {test_probs.shape[1]} classes, VAL has {n_classes}")
    common = {
        "n_folds": n_folds,
        "seed": seed,
        "objective": objective,
        "max_total_drop": max_total_drop,
    }
    fitted: list[tuple[str, MethodFit, CVEstimate, float]] = []
    for index, method in enumerate(methods):
        if progress is not None:
            progress(method, index, len(methods))
        start = time.perf_counter()
        prior_arg = {"prior": prior} if method == "prior-match" else {}
        fit = fit_method(method, val_probs, val_labels, **prior_arg, **common)
        estimate = cross_validate(method, val_probs, val_labels, **prior_arg, **common)
        fitted.append((method, fit, estimate, time.perf_counter() - start))

    # the decision: VAL only, before TEST is looked at
    estimates = [estimate for _, _, estimate, _ in fitted]
    recommended = recommend(estimates, objective=objective, max_total_drop=max_total_drop)
    # the eligibility recommend() applies (cnnbal.sweep.choose on the fold scores)
    eligible = choose(
        np.stack([e.fold_scores for e in estimates]),
        estimates[0].raw_fold_scores,
        objective=objective,
        max_total_drop=max_total_drop,
    ).eligible

    results = []
    for (method, fit, estimate, seconds), ok in zip(fitted, eligible, strict=True):
        test = None
        if test_probs is not None:
            test = _score_test(fit, test_probs, test_labels, n_boot, seed)
        results.append(MethodResult(method, fit, estimate, bool(ok), seconds, test))
    return MethodComparison(
        results=tuple(results),
        recommended=recommended,
        objective=objective,
        max_total_drop=float(max_total_drop),
        n_folds=int(n_folds),
        seed=int(seed),
        n_val=int(n_val),
        n_classes=int(n_classes),
        n_test=None if test_probs is None else len(test_probs),
        n_boot=int(n_boot),
        seconds=time.perf_counter() - started,
    )


def _score_test(
    fit: MethodFit, probs: np.ndarray, labels: np.ndarray, n_boot: int, seed: int
) -> TestResult:
    corrected = fit.correction.apply(probs)
    comparison = compare_outputs(probs, corrected, labels, val_class_accuracy=fit.class_accuracy)
    pred_raw = probs.argmax(axis=1)
    pred_new = corrected.argmax(axis=1)
    intervals = paired_bootstrap(
        labels,
        pred_raw,
        pred_new,
        n_classes=probs.shape[1],
        low20_val_classes=comparison.low20_val_classes,
        n_boot=n_boot,
        seed=seed,
    )
    return TestResult(comparison, intervals, int(np.sum(pred_raw != pred_new)))
