"""Balancing and calibration methods beyond the paper, chosen honestly (docs/method.md section 8).

Every method fits a :class:`~cnnbal.corrections.Correction` on validation
outputs; hyper-parameters not given are chosen by stratified k-fold
cross-validation on the validation set only, with the objective and the
total-accuracy constraint of :func:`cnnbal.sweep.choose` (the same rule as
``cnnbal sweep``).

=====================  ==============  =====================================================
method                 kind            what is fitted (``z = log p``, ``q = softmax(.)``)
=====================  ==============  =====================================================
``elaborated``         affine          Choi (2017), :func:`cnnbal.core.fit_elaborated`
``naive``              affine          Choi (2017), :func:`cnnbal.core.fit_naive`
``logit-adjust``       logit_bias      ``b = -tau log pi``, ``pi`` the mean validation output
                                       (Menon et al. 2021, post-hoc logit adjustment)
``class-balanced-ce``  logit_bias      ``min_b mean_k CE_k(b) + l2/(2K) |b|^2``
``class-dro``          logit_bias      ``min_b eta log sum_k exp(CE_k(b) / eta)``
                                       (Sagawa et al. 2020, soft-max over classes)
``prior-match``        logit_bias      ``b`` with ``mean_n softmax((z_n + b)/T) = prior``
                                       (Saerens et al. 2002; no labels needed)
``worst20-ascent``     logit_bias      coordinate ascent of ``b`` on the worst-20% accuracy,
                                       then ``b <- shrink * b``
``temperature``        temperature     ``min_T NLL(softmax(z / T))`` (Guo et al. 2017)
``vector-scaling``     vector_scaling  ``min_{a,c} NLL(softmax(a * z + c))`` (Guo et al. 2017)
=====================  ==============  =====================================================

``CE_k(b)`` is the mean cross-entropy ``-log q_{n, c_n}`` over the validation
samples of class k.

A class with no labelled samples in the data a fit sees (the validation set,
or a CV training fold) keeps a neutral parameter, because every labelled
objective above is lowest when such a class is never predicted (its bias
would run to about -20 nats and the class would vanish from the test
predictions). ``class-balanced-ce``, ``class-dro`` and labelled
``prior-match`` are fitted on the other classes' columns only (softmax and
target prior restricted to them; all three are blind to a common shift of
the biases) and the class gets the mean of the fitted biases, i.e. 0 after
centring; ``logit-adjust`` gives it 0 too (its mean prediction on a set
without the class says nothing about the class's prior); ``vector-scaling``
gives it the mean of the fitted scales and bias 0, so that where the fit is
a common temperature the class is predicted exactly as the others;
``worst20-ascent`` never raises it (it only raises the worst classes
present), as any class it does not raise. :attr:`MethodFit.warnings` names
these classes. Without labels (``prior-match --unlabelled``) no class can be
known to be absent and nothing is pinned.

Smooth problems are solved with L-BFGS (scipy) and analytic gradients; see
:func:`_BiasProblem` for the shared evaluation, which costs two matrix-vector
products per step.

Pure functions: no printing, no files; randomness takes a seed.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from cnnbal.core import DEFAULT_PARAMS, FitParams, FitResult, _class_list, class_accuracy
from cnnbal.corrections import Correction, log_probs, normalised_log
from cnnbal.errors import CnnbalError
from cnnbal.metrics import low_fraction_count, lowest_classes
from cnnbal.sweep import (
    DEFAULT_MAX_TOTAL_DROP,
    OBJECTIVES,
    SCORE_NAMES,
    choose,
    stratified_folds,
)

__all__ = [
    "HYPERPARAMS",
    "METHOD_NAMES",
    "PRIORS",
    "UNLABELLED_TEMPERATURE",
    "CVEstimate",
    "MethodFit",
    "cross_validate",
    "fit_method",
    "paired_bootstrap",
    "recommend",
]

#: The methods of ``fit --method``, in report order.
METHOD_NAMES = (
    "elaborated",
    "naive",
    "logit-adjust",
    "class-balanced-ce",
    "class-dro",
    "prior-match",
    "worst20-ascent",
    "temperature",
    "vector-scaling",
)

#: Per method, its hyper-parameters and the default grid CV chooses from.
#: A method with no entry has nothing chosen by CV (elaborated: use ``cnnbal sweep``).
HYPERPARAMS: dict[str, dict[str, tuple[float, ...]]] = {
    "elaborated": {},
    "naive": {},
    "logit-adjust": {"tau": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)},
    "class-balanced-ce": {"l2": (3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.0)},
    "class-dro": {"eta": (10.0, 3.0, 1.0, 0.5, 0.3)},
    "prior-match": {"temperature": (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)},
    "worst20-ascent": {"shrink": (0.0, 0.25, 0.5, 0.75, 1.0)},
    "temperature": {},
    "vector-scaling": {},
}

#: Named target priors of ``prior-match`` (an array of K positive weights is also accepted).
PRIORS = ("uniform", "val")

#: Temperature of ``prior-match`` fitted without labels (CV cannot choose it there):
#: T = 1 matches the mean of the model's own probabilities.
UNLABELLED_TEMPERATURE = 1.0

# Two means closer than this are a tie (as in cnnbal.sweep).
_TIE = 1e-12
# L-BFGS stopping: gradient entries below this (objectives are O(1) means).
_GTOL = 1e-7
_MAX_ITER = 500


# ====================================================================== results


@dataclass(frozen=True)
class MethodFit:
    """A fitted method.

    Attributes
    ----------
    method : str
        One of :data:`METHOD_NAMES`.
    correction : Correction
    hyper : dict of str to float
        The hyper-parameter values used (given or chosen by CV); a value CV could
        not choose (nothing eligible: the zero bias is used) is left out.
    chosen_by_cv : bool
        True when at least one value came from cross-validation.
    cv : dict or None
        JSON-friendly record of the choice: ``name``, ``grid``, ``mean_scores``
        (score name -> list of mean held-out scores per grid value, fractions),
        ``raw_mean_scores``, ``eligible``, ``chosen``, ``n_folds``, ``seed``,
        ``objective``, ``max_total_drop``. None when nothing was chosen.
    class_accuracy : ndarray of shape (n_classes,) or None
        Raw per-class validation accuracy (NaN: no samples); None without labels.
    class_counts : ndarray of shape (n_classes,), int64, or None
    n_samples : int
    fit_seconds : float
        Wall time of the whole fit, CV included.
    warnings : tuple of str
    fit_result : FitResult or None
        The core's result for ``elaborated`` / ``naive``.
    """

    method: str
    correction: Correction
    hyper: dict[str, float]
    chosen_by_cv: bool
    cv: dict | None
    class_accuracy: np.ndarray | None
    class_counts: np.ndarray | None
    n_samples: int
    fit_seconds: float = 0.0
    warnings: tuple[str, ...] = field(default=())
    fit_result: FitResult | None = None


@dataclass(frozen=True)
class CVEstimate:
    """Cross-validated scores of a whole method (hyper-parameter choice included).

    Attributes
    ----------
    method : str
    score_names : tuple of str
        :data:`cnnbal.sweep.SCORE_NAMES`.
    raw_fold_scores : ndarray of shape (n_folds, len(score_names))
        The raw outputs' scores on each held-out fold (fractions).
    fold_scores : ndarray of shape (n_folds, len(score_names))
        The corrected outputs' scores on the same folds.
    hyper_per_fold : tuple of dict
        The hyper-parameters each outer fold's fit used.
    n_folds, seed : int
    fit_seconds : float
        Mean wall time of one fit (its inner CV included).
    raw_pooled_scores, pooled_scores : ndarray of shape (len(score_names),)
        The scores of the held-out predictions of all folds put together.
        Informative, but optimistic for the per-class scores (worst-20%,
        low-20%), so :func:`recommend` does not use them: the classes found
        worst on the pooled predictions are those whose validation samples
        happen to be hard, and every fold's fit learnt to raise them from the
        other folds' share of the same samples. On the WRN CIFAR-100
        validation halves the pooled worst-20% gain was about twice the gain
        the same fits made on the test halves, for every method.
    """

    method: str
    score_names: tuple[str, ...]
    raw_fold_scores: np.ndarray
    fold_scores: np.ndarray
    hyper_per_fold: tuple[dict, ...]
    n_folds: int
    seed: int
    fit_seconds: float
    raw_pooled_scores: np.ndarray | None = None
    pooled_scores: np.ndarray | None = None

    @property
    def mean_raw(self) -> dict[str, float]:
        return dict(zip(self.score_names, self.raw_fold_scores.mean(axis=0).tolist(), strict=True))

    @property
    def mean(self) -> dict[str, float]:
        return dict(zip(self.score_names, self.fold_scores.mean(axis=0).tolist(), strict=True))

    @property
    def pooled_change(self) -> dict[str, float]:
        """Pooled out-of-fold score minus raw's, per score (fractions)."""
        change = self.pooled_scores - self.raw_pooled_scores
        return dict(zip(self.score_names, change.tolist(), strict=True))

    @property
    def mean_change(self) -> dict[str, float]:
        """Mean over folds of corrected minus raw, per score (fractions)."""
        change = (self.fold_scores - self.raw_fold_scores).mean(axis=0)
        return dict(zip(self.score_names, change.tolist(), strict=True))


# ====================================================================== public functions


def fit_method(
    method: str,
    probs: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    hyper: Mapping[str, float] | None = None,
    prior: str | np.ndarray = "uniform",
    unlabelled: bool = False,
    n_folds: int = 5,
    seed: int = 0,
    objective: str = "worst20",
    max_total_drop: float = DEFAULT_MAX_TOTAL_DROP,
    params: FitParams | None = None,
) -> MethodFit:
    """Fit ``method`` on validation outputs, choosing missing hyper-parameters by CV.

    Parameters
    ----------
    method : str
        One of :data:`METHOD_NAMES`.
    probs : ndarray of shape (n_samples, n_classes)
        Validation softmax outputs (validated: finite, non-negative, rows sum to 1).
    labels : ndarray of shape (n_samples,), int, optional
        True classes; required except for ``prior-match`` with ``unlabelled``.
    hyper : dict of str to float, optional
        Values for the method's hyper-parameters (:data:`HYPERPARAMS`); a value
        given is used as is, one missing is chosen by CV from its default grid.
    prior : {"uniform", "val"} or ndarray of shape (n_classes,)
        ``prior-match``'s target: uniform, the validation label frequencies, or
        the given positive weights (normalised to sum to 1).
    unlabelled : bool
        ``prior-match`` only: fit without labels (temperature
        :data:`UNLABELLED_TEMPERATURE` unless given).
    n_folds, seed : int
        Stratified folds of the CV (:func:`cnnbal.sweep.stratified_folds`).
    objective : {"worst20", "low20_val", "balanced", "total"}
        What CV maximises (:data:`cnnbal.sweep.OBJECTIVES`).
    max_total_drop : float
        Percentage points: grid values whose CV total accuracy falls further
        below raw are not eligible. When none is, the identity (zero bias) is
        used and a warning says so.
    params : FitParams, optional
        ``elaborated`` only: its four parameters (the paper's by default).

    Returns
    -------
    MethodFit

    Raises
    ------
    CnnbalError
        Unknown method, hyper-parameter or prior; labels missing where needed.
    """
    start = time.perf_counter()
    _check_method(method)
    hyper = _check_hyper(method, hyper)
    with _one_blas_thread():
        fitted = _fit_method(
            method,
            probs,
            labels,
            hyper,
            prior,
            unlabelled,
            n_folds,
            seed,
            objective,
            max_total_drop,
            params,
        )
    return replace(fitted, fit_seconds=time.perf_counter() - start)


def _fit_method(
    method,
    probs,
    labels,
    hyper,
    prior,
    unlabelled,
    n_folds,
    seed,
    objective,
    max_total_drop,
    params,
) -> MethodFit:
    """:func:`fit_method` after the method and hyper-parameters are checked."""
    if objective not in OBJECTIVES:
        raise CnnbalError(
            f"--objective: unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}"
        )
    n_samples, n_classes = probs.shape
    if unlabelled and method != "prior-match":
        raise CnnbalError(f"--unlabelled: only prior-match fits without labels, not {method}")
    if labels is None and not unlabelled:
        raise CnnbalError(f"{method}: needs labels (only prior-match --unlabelled fits without)")
    if params is not None and method != "elaborated":
        raise CnnbalError(f"r_low/r_high/beta/alpha apply to the elaborated fit, not {method}")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        accuracy, counts = class_accuracy(probs, labels, n_classes)
    else:
        accuracy = counts = None
    target = _target_prior(prior, labels if not unlabelled else None, n_classes, method)
    notes: list[str] = []

    if method in ("elaborated", "naive"):
        from cnnbal.core import fit as core_fit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # they are in result.warnings
            result = core_fit(probs, labels, method, params or DEFAULT_PARAMS)
        return MethodFit(
            method=method,
            correction=Correction.affine(result.H, result.apply_gate),
            hyper=result.params.as_dict() if result.params is not None else {},
            chosen_by_cv=False,
            cv=None,
            class_accuracy=accuracy,
            class_counts=counts,
            n_samples=n_samples,
            warnings=result.warnings,
            fit_result=result,
        )

    fitter = _FITTERS[method]
    z = log_probs(probs)
    fit_labels = None if unlabelled else labels
    if counts is not None and not unlabelled and method in _PER_CLASS_METHODS:
        empty = tuple(int(k) for k in np.flatnonzero(counts == 0))
        if empty:
            notes.append(
                f"{len(empty)} class(es) with no validation samples keep a neutral "
                f"{_PER_CLASS_METHODS[method]}: {_class_list(empty)}"
            )
    names = tuple(HYPERPARAMS[method])
    missing = [n for n in names if n not in hyper]
    cv_record = None
    if missing and unlabelled:
        # no labels, no CV: prior-match's documented default
        hyper["temperature"] = UNLABELLED_TEMPERATURE
        notes.append(
            f"fitted without labels: temperature {UNLABELLED_TEMPERATURE:g} (the default; "
            "CV needs labels)"
        )
    elif missing:
        (name,) = missing  # every method has at most one hyper-parameter
        grid = HYPERPARAMS[method][name]
        choice_value, cv_record, cv_notes = _choose_by_cv(
            method, z, labels, name, grid, target, n_folds, seed, objective, max_total_drop
        )
        notes += cv_notes
        if choice_value is None:
            # no value is used: the hyper-parameter stays out of ``hyper``
            correction = Correction.identity(n_classes)
            return MethodFit(
                method=method,
                correction=correction,
                hyper=hyper,
                chosen_by_cv=True,
                cv=cv_record,
                class_accuracy=accuracy,
                class_counts=counts,
                n_samples=n_samples,
                warnings=tuple(notes),
            )
        hyper[name] = choice_value
    (correction,) = fitter(z, fit_labels, [hyper] if names else [{}], target, None)
    return MethodFit(
        method=method,
        correction=correction,
        hyper=hyper,
        chosen_by_cv=cv_record is not None,
        cv=cv_record,
        class_accuracy=accuracy,
        class_counts=counts,
        n_samples=n_samples,
        warnings=tuple(notes),
    )


def cross_validate(
    method: str,
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    hyper: Mapping[str, float] | None = None,
    prior: str | np.ndarray = "uniform",
    n_folds: int = 5,
    seed: int = 0,
    objective: str = "worst20",
    max_total_drop: float = DEFAULT_MAX_TOTAL_DROP,
    params: FitParams | None = None,
) -> CVEstimate:
    """Cross-validated raw and corrected scores of a whole method (nested CV).

    Each outer fold fits :func:`fit_method` on the other folds (whose own inner
    CV, on those folds only, chooses the hyper-parameters) and scores the
    held-out fold, so the estimate includes the choice and is not biased by
    it. The scores are :data:`cnnbal.sweep.SCORE_NAMES`, computed as in
    ``cnnbal sweep`` (``low20_val``'s classes by the training folds' raw
    accuracy).

    Parameters
    ----------
    method, hyper, prior, n_folds, seed, objective, max_total_drop, params
        As :func:`fit_method` (the outer folds use ``seed``, the inner CV
        ``seed + 1``).
    probs : ndarray of shape (n_samples, n_classes)
    labels : ndarray of shape (n_samples,), int

    Returns
    -------
    CVEstimate
    """
    _check_method(method)
    labels = np.asarray(labels, dtype=np.int64)
    n_classes = probs.shape[1]
    folds = stratified_folds(labels, n_folds, seed)
    raw_pred = probs.argmax(axis=1)
    raw_scores = np.empty((n_folds, len(SCORE_NAMES)))
    scores = np.empty_like(raw_scores)
    hypers = []
    seconds = 0.0
    scorers = []
    oof_pred = []
    for k, (train, test) in enumerate(folds):
        scorer = _HeldOutScorer.build(raw_pred, labels, train, test, n_classes)
        scorers.append(scorer)
        fitted = fit_method(
            method,
            probs[train],
            labels[train],
            hyper=hyper,
            prior=prior,
            n_folds=n_folds,
            seed=seed + 1,
            objective=objective,
            max_total_drop=max_total_drop,
            params=params,
        )
        seconds += fitted.fit_seconds
        hypers.append(dict(fitted.hyper))
        raw_scores[k] = scorer.scores(raw_pred[test])
        oof_pred.append(fitted.correction.predict(probs[test]))
        scores[k] = scorer.scores(oof_pred[-1])
    pooled = _HeldOutScorer.pooled(scorers)
    return CVEstimate(
        method=method,
        score_names=SCORE_NAMES,
        raw_fold_scores=raw_scores,
        fold_scores=scores,
        hyper_per_fold=tuple(hypers),
        n_folds=int(n_folds),
        seed=int(seed),
        fit_seconds=seconds / n_folds,
        raw_pooled_scores=pooled.scores(np.concatenate([raw_pred[test] for _, test in folds])),
        pooled_scores=pooled.scores(np.concatenate(oof_pred)),
    )


def recommend(
    cv_estimates: Mapping[str, CVEstimate] | Sequence[CVEstimate],
    objective: str = "worst20",
    max_total_drop: float = DEFAULT_MAX_TOTAL_DROP,
) -> str | None:
    """The method to recommend, from cross-validated estimates on VAL only.

    The rule of :func:`cnnbal.sweep.choose` applied to methods: a method is
    eligible when its mean CV total accuracy is at most ``max_total_drop``
    points below raw; the eligible method with the highest mean CV objective
    wins (ties: higher mean total, then smaller spread of the objective over
    folds, then the earlier method). None when no eligible method beats the
    raw outputs on the objective: keep the raw outputs.

    Parameters
    ----------
    cv_estimates : mapping of method to CVEstimate, or sequence of CVEstimate
        All computed on the same folds (same data, ``n_folds`` and ``seed``).
    objective : {"worst20", "low20_val", "balanced", "total"}
    max_total_drop : float
        Percentage points.

    Returns
    -------
    str or None
    """
    estimates = list(cv_estimates.values() if isinstance(cv_estimates, Mapping) else cv_estimates)
    if not estimates:
        return None
    folds = {(e.n_folds, e.seed) for e in estimates}
    if len(folds) > 1:
        raise CnnbalError("recommend: the estimates were computed on different folds")
    fold_scores = np.stack([e.fold_scores for e in estimates])
    raw = estimates[0].raw_fold_scores
    choice = choose(fold_scores, raw, objective=objective, max_total_drop=max_total_drop)
    if choice.index is None or not choice.beats_raw:
        return None
    return estimates[choice.index].method


def paired_bootstrap(
    labels: np.ndarray,
    pred_raw: np.ndarray,
    pred_new: np.ndarray,
    *,
    n_classes: int | None = None,
    low20_val_classes: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the change (new - raw) of each metric.

    The samples are resampled with replacement, the same indices for both
    sets of predictions (paired), ``n_boot`` times; per-class counts of each
    resample come from one ``bincount`` over ``(resample, class)`` pairs.
    Per-class summaries leave out classes absent from a resample (as
    :func:`cnnbal.metrics.summarize` does).

    Parameters
    ----------
    labels, pred_raw, pred_new : ndarray of shape (n_samples,), int
    n_classes : int, optional
        Defaults to the largest class seen plus one.
    low20_val_classes : ndarray of int, optional
        The class set of ``low20_val_accuracy`` (chosen on validation); the
        key is left out when None.
    n_boot, seed : int
    level : float
        Coverage of the interval (0.95: the 2.5th and 97.5th percentiles).

    Returns
    -------
    dict of str to (float, float)
        ``total_accuracy``, ``worst20_accuracy``, ``low20_val_accuracy`` (when
        classes are given), ``balanced_accuracy``, ``worst_class_accuracy``:
        (low, high) of the change, as fractions.
    """
    labels = np.asarray(labels, dtype=np.int64)
    pred_raw = np.asarray(pred_raw)
    pred_new = np.asarray(pred_new)
    n = len(labels)
    if n == 0:
        raise CnnbalError("paired_bootstrap: no samples")
    if n_classes is None:
        n_classes = int(max(labels.max(), pred_raw.max(), pred_new.max())) + 1
    right_raw = pred_raw == labels
    right_new = pred_new == labels
    member = None if low20_val_classes is None else np.isin(labels, low20_val_classes)
    n_low = low_fraction_count(n_classes)
    rng = np.random.default_rng(seed)
    keys = ["total_accuracy", "worst20_accuracy", "balanced_accuracy", "worst_class_accuracy"]
    if member is not None:
        keys.insert(2, "low20_val_accuracy")
    changes = {key: np.empty(n_boot) for key in keys}
    # resamples in chunks of about 2e6 indices to bound memory
    chunk = max(1, min(n_boot, 2_000_000 // n))
    for first in range(0, n_boot, chunk):
        b = min(chunk, n_boot - first)
        idx = rng.integers(0, n, size=(b, n))
        cls = labels[idx] + n_classes * np.arange(b)[:, None]  # (resample, class) pairs
        counts = np.bincount(cls.ravel(), minlength=b * n_classes).reshape(b, n_classes)
        present = counts > 0
        for name, right in (("raw", right_raw), ("new", right_new)):
            r = right[idx]
            correct = np.bincount(cls[r], minlength=b * n_classes).reshape(b, n_classes)
            with np.errstate(invalid="ignore", divide="ignore"):
                recall = np.where(present, correct / counts, np.nan)
            stats = {
                "total_accuracy": r.mean(axis=1),
                # NaN (absent) sorts last, so the first n_low are the worst present
                "worst20_accuracy": np.nanmean(np.sort(recall, axis=1)[:, :n_low], axis=1),
                "balanced_accuracy": np.nanmean(recall, axis=1),
                "worst_class_accuracy": np.nanmin(recall, axis=1),
            }
            if member is not None:
                m = member[idx]
                with np.errstate(invalid="ignore", divide="ignore"):
                    stats["low20_val_accuracy"] = (r & m).sum(axis=1) / m.sum(axis=1)
            sign = 1.0 if name == "new" else -1.0
            for key in keys:
                if name == "raw":
                    changes[key][first : first + b] = sign * stats[key]
                else:
                    changes[key][first : first + b] += stats[key]
    tail = 100.0 * (1.0 - level) / 2.0
    out = {}
    for key in keys:
        low, high = np.nanpercentile(changes[key], [tail, 100.0 - tail])
        out[key] = (float(low), float(high))
    return out


# ====================================================================== validation


def _check_method(method: str) -> None:
    if method not in METHOD_NAMES:
        raise CnnbalError(
            f"--method: unknown method {method!r}; expected one of {', '.join(METHOD_NAMES)}"
        )


def _check_hyper(method: str, hyper: Mapping[str, float] | None) -> dict[str, float]:
    hyper = dict(hyper or {})
    allowed = HYPERPARAMS[method]
    for name, value in hyper.items():
        if name not in allowed:
            expected = ", ".join(allowed) if allowed else "none"
            raise CnnbalError(f"{method}: unknown hyper-parameter {name!r} (expected: {expected})")
        value = float(value)
        if not math.isfinite(value):
            raise CnnbalError(f"--{name}: {value} is not a finite number")
        if name in ("temperature", "eta") and not value > 0:
            raise CnnbalError(f"--{name}: must be > 0, got {value:g}")
        if name in ("tau", "l2") and value < 0:
            raise CnnbalError(f"--{name}: must be >= 0, got {value:g}")
        if name == "shrink" and not 0.0 <= value <= 1.0:
            raise CnnbalError(f"--shrink: must be in [0, 1], got {value:g}")
        hyper[name] = value
    return hyper


def _target_prior(
    prior: str | np.ndarray, labels: np.ndarray | None, n_classes: int, method: str
) -> np.ndarray | str:
    """The target prior of prior-match: an ndarray (K,) summing to 1, or ``"val"``.

    ``"val"`` stays symbolic so that each CV fold uses its own training labels.
    """
    if isinstance(prior, str):
        if prior == "uniform":
            return np.full(n_classes, 1.0 / n_classes)
        if prior == "val":
            if labels is None:
                raise CnnbalError("--prior val: needs labels (use uniform or a file without them)")
            return "val"
        raise CnnbalError(
            f"--prior: unknown prior {prior!r}; expected uniform, val or a vector of K weights"
        )
    weights = np.asarray(prior, dtype=np.float64)
    if weights.shape != (n_classes,):
        raise CnnbalError(f"--prior: expected {n_classes} weights, got shape {weights.shape}")
    if not np.all(np.isfinite(weights)) or not np.all(weights > 0):
        raise CnnbalError("--prior: every weight must be a positive finite number")
    del method
    return weights / weights.sum()


def _resolve_prior(target, labels: np.ndarray | None, n_classes: int) -> np.ndarray:
    if not isinstance(target, str):
        return target
    # "val": the label frequencies; every class has a sample here, because a class
    # without one is left out of the fit before (_on_present_classes)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return counts / counts.sum()


# ====================================================================== cross-validation


@dataclass(frozen=True)
class _HeldOutScorer:
    """Scores of :data:`SCORE_NAMES` on one held-out fold, as ``cnnbal sweep`` computes them."""

    labels: np.ndarray
    counts: np.ndarray
    present: np.ndarray
    low20_val_member: np.ndarray
    n_low: int

    @classmethod
    def build(cls, raw_pred, labels, train, test, n_classes) -> _HeldOutScorer:
        train_labels = labels[train]
        correct = np.bincount(train_labels[raw_pred[train] == train_labels], minlength=n_classes)
        train_counts = np.bincount(train_labels, minlength=n_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(train_counts > 0, correct / np.maximum(train_counts, 1), np.nan)
        test_labels = labels[test]
        counts = np.bincount(test_labels, minlength=n_classes)
        n_low = low_fraction_count(n_classes)
        low20_val = lowest_classes(np.where(counts > 0, accuracy, np.nan), n_low)
        return cls(
            labels=test_labels,
            counts=counts,
            present=counts > 0,
            low20_val_member=np.isin(test_labels, low20_val),
            n_low=n_low,
        )

    @classmethod
    def pooled(cls, scorers: Sequence[_HeldOutScorer]) -> _HeldOutScorer:
        """One scorer for the held-out folds put together (predictions concatenated in fold order).

        Each sample keeps its own fold's ``low20_val`` membership (classes chosen
        by that fold's training accuracy).
        """
        return cls(
            labels=np.concatenate([s.labels for s in scorers]),
            counts=np.sum([s.counts for s in scorers], axis=0),
            present=np.any([s.present for s in scorers], axis=0),
            low20_val_member=np.concatenate([s.low20_val_member for s in scorers]),
            n_low=scorers[0].n_low,
        )

    def scores(self, pred: np.ndarray) -> np.ndarray:
        right = pred == self.labels
        correct = np.bincount(self.labels[right], minlength=len(self.counts))
        recall = correct[self.present] / self.counts[self.present]
        member = self.low20_val_member
        n_member = np.count_nonzero(member)
        return np.array(
            [
                np.count_nonzero(right) / len(self.labels),
                np.sort(recall)[: self.n_low].mean(),
                recall.mean(),
                np.count_nonzero(right[member]) / n_member if n_member else np.nan,
            ]
        )


def _choose_by_cv(method, z, labels, name, grid, target, n_folds, seed, objective, max_drop):
    """Cross-validated scores of each grid value and the choice of :func:`cnnbal.sweep.choose`.

    The choice uses the mean of the held-out folds' scores, as ``cnnbal sweep``
    does; the scores of the pooled out-of-fold predictions are recorded too
    (see :class:`CVEstimate` for why they are not used to choose).

    Returns
    -------
    value : float or None
        None when no grid value is eligible.
    record : dict
        The JSON-friendly ``cv`` of :class:`MethodFit`.
    notes : list of str
    """
    n_classes = z.shape[1]
    folds = stratified_folds(labels, n_folds, seed)
    raw_pred = z.argmax(axis=1)
    fold_scores = np.empty((len(grid), n_folds, len(SCORE_NAMES)))
    raw_scores = np.empty((n_folds, len(SCORE_NAMES)))
    fitter = _FITTERS[method]
    scorers = []
    oof_pred = np.empty((len(grid), len(labels)), dtype=np.int64)
    position = 0
    for k, (train, test) in enumerate(folds):
        scorer = _HeldOutScorer.build(raw_pred, labels, train, test, n_classes)
        scorers.append(scorer)
        raw_scores[k] = scorer.scores(raw_pred[test])
        corrections = fitter(z[train], labels[train], [{name: v} for v in grid], target, None)
        z_test = z[test]
        for i, correction in enumerate(corrections):
            pred = _predict_logits(correction, z_test)
            fold_scores[i, k] = scorer.scores(pred)
            oof_pred[i, position : position + len(test)] = pred
        position += len(test)
    pooled = _HeldOutScorer.pooled(scorers)
    raw_oof = np.concatenate([raw_pred[test] for _, test in folds])
    pooled_scores = np.array([pooled.scores(pred) for pred in oof_pred])
    choice = choose(fold_scores, raw_scores, objective=objective, max_total_drop=max_drop)
    mean = fold_scores.mean(axis=1)
    record = {
        "name": name,
        "grid": [float(v) for v in grid],
        "scoring": "mean over held-out folds (as cnnbal sweep)",
        "mean_scores": {s: mean[:, j].tolist() for j, s in enumerate(SCORE_NAMES)},
        "raw_mean_scores": dict(zip(SCORE_NAMES, raw_scores.mean(axis=0).tolist(), strict=True)),
        "pooled_scores": {s: pooled_scores[:, j].tolist() for j, s in enumerate(SCORE_NAMES)},
        "raw_pooled_scores": dict(zip(SCORE_NAMES, pooled.scores(raw_oof).tolist(), strict=True)),
        "eligible": choice.eligible.tolist(),
        "chosen": None if choice.index is None else float(grid[choice.index]),
        "beats_raw": bool(choice.beats_raw),
        "n_folds": int(n_folds),
        "seed": int(seed),
        "objective": objective,
        "max_total_drop": float(max_drop),
    }
    notes = []
    if choice.index is None:
        notes.append(
            f"no {name} value keeps the CV total accuracy within {max_drop:g} points of raw: "
            "the zero bias (no change) is used"
        )
        return None, record, notes
    if not choice.beats_raw:
        notes.append(
            f"the chosen {name}={grid[choice.index]:g} does not beat the raw outputs' CV "
            f"{objective}"
        )
    return float(grid[choice.index]), record, notes


def _predict_logits(correction: Correction, z: np.ndarray) -> np.ndarray:
    """Predictions of a log-linear correction from ``z = log_probs(probs)``."""
    if correction.kind == "logit_bias":
        return (z + correction.params["bias"]).argmax(axis=1)
    if correction.kind == "temperature":
        return z.argmax(axis=1)
    return (
        correction.params["scale"] * normalised_log(z.copy()) + correction.params["bias"]
    ).argmax(axis=1)


# ====================================================================== the bias problems


@contextlib.contextmanager
def _one_blas_thread():
    """One BLAS thread for the fits: their products are matrix-vector sized.

    On a busy 2-core machine a multi-threaded (N x K) @ (K,) product took
    11-40 ms against ~1 ms on one thread (5,000 x 100); numpy's and scipy's
    separate OpenBLAS copies make it worse (docs/method.md section 7.1).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a declared dependency
        yield
        return
    import scipy.linalg  # noqa: F401  (load scipy's OpenBLAS first: only loaded ones are limited)

    with threadpool_limits(limits=1, user_api="blas"):
        yield


class _BiasProblem:
    """Fast evaluation of ``sum_n w_n * lse(z_n / T + u)`` and its gradient in ``u``.

    With ``E = exp((z - rowmax z) / T)`` computed once, the row sums of
    ``exp(z_n / T + u)`` are ``E @ exp(u)`` (times the row factor) and the
    weighted softmax mean is ``exp(u) * (E^T (w / s))``: two matrix-vector
    products per evaluation instead of an exponential of the whole matrix.
    ``u`` is shifted by its maximum before the exponential, so nothing
    overflows; the floored log-probabilities keep ``(z - rowmax) / T`` above
    -708 / T, and a row whose sum would underflow (only for biases spread over
    more than ~700 nats) falls back to the direct computation.
    """

    def __init__(self, z: np.ndarray, temperature: float = 1.0) -> None:
        self.z = z
        self.temperature = float(temperature)
        self.row_max = z.max(axis=1) / self.temperature
        scaled = z / self.temperature
        scaled -= self.row_max[:, None]
        np.exp(scaled, out=scaled)
        self.E = scaled

    def lse_and_softmax_mean(
        self, u: np.ndarray, weights: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-row ``lse(z_n / T + u)`` and ``sum_n w_n softmax(z_n / T + u)`` (w = 1 if None)."""
        state = self.state(u)
        return state[0], self.softmax_mean(state, weights)

    def state(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(lse, exp(u - max u), row sums)``; the last two are None on the direct path."""
        shift = u.max()
        eu = np.exp(u - shift)
        sums = self.E @ eu
        if not np.all(sums > 0):  # pragma: no cover - needs biases ~700 nats apart
            logits = self.z / self.temperature + u
            m = logits.max(axis=1)
            q = np.exp(logits - m[:, None])
            s = q.sum(axis=1)
            q /= s[:, None]
            self._direct_q = q
            return m + np.log(s), None, None
        return self.row_max + shift + np.log(sums), eu, sums

    def softmax_mean(self, state, weights: np.ndarray | None) -> np.ndarray:
        """``sum_n w_n softmax(z_n / T + u)`` at the ``u`` of ``state`` (w = 1 if None)."""
        _, eu, sums = state
        if eu is None:  # pragma: no cover - the direct path of state()
            q = self._direct_q
            return q.sum(axis=0) if weights is None else weights @ q
        ratio = 1.0 / sums if weights is None else weights / sums
        return eu * (ratio @ self.E)


def _lbfgs(fun, x0: np.ndarray) -> np.ndarray:
    from scipy.optimize import minimize

    result = minimize(
        fun,
        x0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": _MAX_ITER, "gtol": _GTOL, "ftol": 1e-12, "maxcor": 20},
    )
    return result.x


def _class_ce_problem(z: np.ndarray, labels: np.ndarray):
    """What CB-CE and DRO share: the problem, true-class logits and class counts."""
    n_classes = z.shape[1]
    problem = _BiasProblem(z)
    true_z = z[np.arange(len(labels)), labels]
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return problem, true_z, counts


def _class_losses(problem, true_z, labels, counts, b, weights):
    """Per-class mean CE ``CE_k(b)`` and ``sum_n weights_n q_n`` (weights may be None)."""
    lse, mean_q = problem.lse_and_softmax_mean(b, weights)
    per_sample = lse - true_z - b[labels]
    present = counts > 0
    sums = np.bincount(labels, weights=per_sample, minlength=len(counts))
    ce = np.where(present, sums / np.maximum(counts, 1), 0.0)
    return ce, mean_q


def _absent_classes(labels: np.ndarray | None, n_classes: int) -> np.ndarray | None:
    """Boolean mask of the classes with no sample in ``labels``; None when none is absent.

    None also without labels (nothing can be known to be absent), so that a fit
    on data where every class is present runs exactly as before.
    """
    if labels is None:
        return None
    absent = np.bincount(labels, minlength=n_classes) == 0
    return absent if absent.any() else None


def _on_present_classes(fitter):
    """Run a shift-invariant logit-bias ``fitter`` on the columns of the classes present.

    Every labelled bias objective is lowest when a class without samples is
    never predicted, so such a class is left out of the problem (its column of
    ``z`` and its share of the target prior) and gets the mean of the fitted
    biases: the fitted biases are centred, so that is exactly 0. The fitters
    wrapped are blind to a common shift of the biases, so the mean is the one
    value that says nothing about the class.
    """

    def fit_present(z, labels, hypers, target, x0):
        n_classes = z.shape[1]
        absent = _absent_classes(labels, n_classes)
        if absent is None:
            return fitter(z, labels, hypers, target, x0)
        present = ~absent
        new_index = np.cumsum(present) - 1  # old class -> index among the present
        if not isinstance(target, str):
            target = target[present] / target[present].sum()
        corrections = fitter(
            z[:, present],
            new_index[labels],
            hypers,
            target,
            None if x0 is None else x0[present],
        )
        out = []
        for correction in corrections:
            fitted = correction.params["bias"]
            bias = np.zeros(n_classes)
            bias[present] = fitted - fitted.mean()
            out.append(
                Correction.logit_bias(bias, temperature=float(correction.params["temperature"]))
            )
        return out

    fit_present.__doc__ = fitter.__doc__
    fit_present.__wrapped__ = fitter
    return fit_present


def _fit_class_balanced_ce(z, labels, hypers, target, x0):
    """``min_b (1/K') sum_k CE_k(b) + l2/(2K) |b|^2`` over the K' classes present.

    Gradient: ``(1/K') sum_n (1/n_{c_n}) (q_n - e_{c_n}) + (l2/K) b``. With
    ``l2 = 0`` the objective is flat along ``b + c 1``; L-BFGS started at 0
    moves only orthogonally to it (every gradient sums to 0), so the result
    has mean 0, the same gauge as ``l2 > 0`` gives.
    """
    del target
    n_classes = z.shape[1]
    problem, true_z, counts = _class_ce_problem(z, labels)
    present = counts > 0
    n_present = present.sum()
    weights = 1.0 / (n_present * counts[labels])
    target_mass = np.where(present, 1.0 / n_present, 0.0)
    out = []
    b = np.zeros(n_classes) if x0 is None else x0
    # strongest shrink first: each solution warm-starts the next, weaker one
    order = sorted(range(len(hypers)), key=lambda i: -hypers[i]["l2"])
    solutions: dict[int, np.ndarray] = {}
    for i in order:
        l2 = hypers[i]["l2"] / n_classes

        def fun(b, l2=l2):
            ce, mean_q = _class_losses(problem, true_z, labels, counts, b, weights)
            value = ce[present].mean() + 0.5 * l2 * (b @ b)
            return value, mean_q - target_mass + l2 * b

        b = _lbfgs(fun, b)
        solutions[i] = b - b.mean()
    for i in range(len(hypers)):
        out.append(Correction.logit_bias(solutions[i]))
    return out


def _fit_class_dro(z, labels, hypers, target, x0):
    """``min_b eta log sum_k exp(CE_k(b) / eta)`` over the classes present.

    A soft maximum of the per-class losses (convex: log-sum-exp, increasing,
    of convex functions). Gradient: ``sum_k pi_k grad CE_k`` with
    ``pi = softmax(CE / eta)``, i.e. sample weights ``pi_{c_n} / n_{c_n}`` in
    the class-balanced gradient. Large eta tends to class-balanced CE, small
    eta to the worst class's CE.
    """
    del target
    n_classes = z.shape[1]
    problem, true_z, counts = _class_ce_problem(z, labels)
    present = counts > 0
    inv_counts = np.where(present, 1.0 / np.maximum(counts, 1), 0.0)
    b = np.zeros(n_classes) if x0 is None else x0
    order = sorted(range(len(hypers)), key=lambda i: -hypers[i]["eta"])
    solutions: dict[int, np.ndarray] = {}
    for i in order:
        eta = hypers[i]["eta"]

        def fun(b, eta=eta):
            # CE_k at b for the weights, then the gradient with weights pi_c / n_c
            state = problem.state(b)
            lse = state[0]
            per_sample = lse - true_z - b[labels]
            ce = np.bincount(labels, weights=per_sample, minlength=n_classes) * inv_counts
            scaled = ce[present] / eta
            top = scaled.max()
            pi_present = np.exp(scaled - top)
            total = pi_present.sum()
            pi_present /= total
            value = eta * (top + math.log(total))
            pi = np.zeros(n_classes)
            pi[present] = pi_present
            class_weight = pi * inv_counts
            mean_q = problem.softmax_mean(state, class_weight[labels])
            return value, mean_q - pi

        b = _lbfgs(fun, b)
        solutions[i] = b - b.mean()
    return [Correction.logit_bias(solutions[i]) for i in range(len(hypers))]


def _prior_match_dual(z: np.ndarray, prior: np.ndarray, temperature: float, x0=None):
    """Solve ``mean_n softmax(z_n / T + u) = prior`` for ``u``; return ``b = T u``.

    The convex dual ``F(u) = mean_n lse(z_n / T + u) - prior . u`` has gradient
    ``mean_n softmax(z_n / T + u) - prior``, zero exactly at the match. ``F``
    is flat along ``u + c 1`` (the prior sums to 1), so the result is centred.
    """
    problem = _BiasProblem(z, temperature)
    n = len(z)
    weights = np.full(n, 1.0 / n)

    def fun(u):
        lse, mean_q = problem.lse_and_softmax_mean(u, weights)
        return lse.mean() - prior @ u, mean_q - prior

    u = _lbfgs(fun, np.zeros(z.shape[1]) if x0 is None else x0)
    u -= u.mean()
    return temperature * u


def _fit_prior_match(z, labels, hypers, target, x0):
    """prior-match for each temperature; ``b = T u`` so argmax(z + b) is the corrected prediction.

    The correction returned keeps T: ``softmax((z + b) / T)`` is the matched
    distribution itself.
    """
    del x0
    prior = _resolve_prior(target, labels, z.shape[1])
    out = []
    for hyper in hypers:
        t = hyper["temperature"]
        out.append(Correction.logit_bias(_prior_match_dual(z, prior, t), temperature=t))
    return out


def _fit_logit_adjust(z, labels, hypers, target, x0):
    """``b = -tau log pi`` with ``pi`` the mean softmax output (label-free estimate of the prior).

    Menon et al. (2021) subtract ``tau log`` of the training label prior; after
    training on data we cannot see, the model's own mean prediction on
    validation is the estimate at hand. Centred (softmax ignores a constant).
    """
    del target, x0
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    log_pi = np.log(np.maximum(p.mean(axis=0), np.finfo(np.float64).tiny))
    absent = _absent_classes(labels, z.shape[1])
    if absent is None:
        log_pi -= log_pi.mean()
    else:
        # a set without class k predicts k rarely because k is not there, not
        # because the model learnt a small prior for k: its small mean output
        # would become a large raise. The class keeps the centre, 0.
        log_pi -= log_pi[~absent].mean()
        log_pi[absent] = -0.0  # so that -tau * it is +0.0 (tau >= 0)
    return [Correction.logit_bias(-hyper["tau"] * log_pi) for hyper in hypers]


def _fit_temperature(z, labels, hypers, target, x0):
    """``min_T mean_n -log softmax(z_n / T)_{c_n}``, over ``s = log(1/T)`` (smooth, unbounded)."""
    del hypers, target, x0
    n = len(z)
    true_z = z[np.arange(n), labels]
    z_max = z.max(axis=1, keepdims=True)
    centred = z - z_max
    true_c = true_z - z_max[:, 0]

    def fun(x):
        a = math.exp(x[0])  # 1 / T
        q = np.exp(a * centred)
        s = q.sum(axis=1)
        q /= s[:, None]
        value = np.mean(np.log(s) - a * true_c)
        # d/da: mean(sum_k q_k centred_k - true_c); chain rule da/dx = a
        grad = np.mean(np.einsum("ij,ij->i", q, centred) - true_c) * a
        return value, np.array([grad])

    x = _lbfgs(fun, np.zeros(1))
    return [Correction.temperature(math.exp(-x[0]))]


def _fit_vector_scaling(z, labels, hypers, target, x0):
    """``min_{a, c} mean_n -log softmax(a * z_n + c)_{c_n}``, started at ``a = 1, c = 0``.

    ``z`` is renormalised per row first (:func:`normalised_log`, as apply
    does). A class without samples is left out of the NLL, which is lowest
    when such a class is never predicted (its bias would run to about -20);
    it gets the mean of the fitted scales, because a scale common to all
    classes is temperature scaling and keeps every prediction, and the mean
    bias, 0 after centring.
    """
    del hypers, target, x0
    n_classes = z.shape[1]
    # per-class scales see a per-row constant, so the rows are renormalised over
    # every class, before any column is left out
    zc = normalised_log(z.copy())
    absent = _absent_classes(labels, n_classes)
    if absent is None:
        scale, bias = _vector_scaling_nll(zc, labels)
        return [Correction.vector_scaling(scale, bias - bias.mean())]
    present = ~absent
    fitted_scale, fitted_bias = _vector_scaling_nll(
        zc[:, present], (np.cumsum(present) - 1)[labels]
    )
    scale = np.full(n_classes, fitted_scale.mean())
    scale[present] = fitted_scale
    bias = np.zeros(n_classes)
    bias[present] = fitted_bias - fitted_bias.mean()
    return [Correction.vector_scaling(scale, bias)]


def _vector_scaling_nll(zc: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ``mean_n -log softmax(a * zc_n + c)_{c_n}`` from ``a = 1, c = 0``; ``(a, c)``.

    Gradients: ``d/dc = mean_n (q_n - e_{c_n})``, ``d/da_k = mean_n (q_nk - e_{c_n k}) zc_nk``.

    Parameters
    ----------
    zc : ndarray of shape (n_samples, n_classes)
        Renormalised log-probabilities.
    labels : ndarray of shape (n_samples,), int

    Returns
    -------
    scale, bias : ndarray of shape (n_classes,)
        ``bias`` not centred.
    """
    n, n_classes = zc.shape
    rows = np.arange(n)
    onehot_z = np.bincount(labels, weights=zc[rows, labels], minlength=n_classes) / n
    onehot = np.bincount(labels, minlength=n_classes) / n

    def fun(x):
        a, c = x[:n_classes], x[n_classes:]
        logits = zc * a + c
        m = logits.max(axis=1, keepdims=True)
        q = np.exp(logits - m)
        s = q.sum(axis=1)
        q /= s[:, None]
        value = np.mean(m[:, 0] + np.log(s) - logits[rows, labels])
        grad_c = q.mean(axis=0) - onehot
        grad_a = np.einsum("ij,ij->j", q, zc) / n - onehot_z
        return value, np.concatenate([grad_a, grad_c])

    x = _lbfgs(fun, np.concatenate([np.ones(n_classes), np.zeros(n_classes)]))
    return x[:n_classes], x[n_classes:]


def _fit_worst20_ascent(z, labels, hypers, target, x0):
    """Coordinate ascent of the biases on the training worst-20% accuracy, then shrink.

    One ascent (it does not depend on ``shrink``), scaled per hyper value.
    """
    del target, x0
    b = _worst20_ascent(z, labels)
    return [Correction.logit_bias(hyper["shrink"] * b) for hyper in hypers]


#: Steps tried for one class's bias in the ascent (nats).
_ASCENT_STEPS = np.array([0.05, 0.1, 0.2, 0.4, 0.8, 1.6])
_ASCENT_MAX_STEPS = 200


def _worst20_ascent(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Greedy coordinate ascent of per-class biases on the worst-20% accuracy.

    At each step, for every class among the current worst 20% (by recall on
    these samples) and every step size of :data:`_ASCENT_STEPS`, the bias of
    that class is raised and the worst-20% accuracy (then total accuracy, to
    break ties) recomputed exactly; the best move is taken if it raises the
    worst-20% accuracy, else the ascent stops. A raise of class k's bias can
    only move a sample's prediction to k, so each trial touches only the
    samples whose class-k score is within the step of their best score.

    Returns
    -------
    ndarray of shape (n_classes,)
        Centred biases.
    """
    n, n_classes = z.shape
    n_low = low_fraction_count(n_classes)
    # column-major: each trial reads one class's scores
    scores = np.asfortranarray(z, dtype=np.float64).copy(order="F")
    b = np.zeros(n_classes)
    pred = scores.argmax(axis=1)
    best = scores[np.arange(n), pred]
    counts = np.bincount(labels, minlength=n_classes)
    present = counts > 0
    correct = np.bincount(labels[pred == labels], minlength=n_classes).astype(np.int64)
    max_step = _ASCENT_STEPS[-1]

    n_steps = len(_ASCENT_STEPS)
    step_offsets = (np.arange(n_steps) * n_classes)[:, None]

    def summaries(correct_counts):
        """(worst-20%, total correct) of each row of correct counts, shape (m, n_classes)."""
        recall = correct_counts[:, present] / counts[present]
        return np.sort(recall, axis=1)[:, :n_low].mean(axis=1), correct_counts.sum(axis=1)

    worst20, total = summaries(correct[None])
    current = (float(worst20[0]), int(total[0]))
    for _ in range(_ASCENT_MAX_STEPS):
        recall = np.where(present, correct / np.maximum(counts, 1), np.inf)
        worst = lowest_classes(recall, n_low)
        best_move = None
        best_value = current
        for k in worst:
            gap = best - scores[:, k]  # >= 0; rows predicted k cannot change
            near = np.flatnonzero((pred != k) & (gap <= max_step))
            if near.size == 0:
                continue
            near_gap = gap[near]
            near_labels = labels[near]
            change = (near_labels == k).astype(np.int64) - (pred[near] == near_labels)
            # every step at once, (n_steps, n_near); ties go to the lower class
            # index (argmax's first maximum)
            steps = _ASCENT_STEPS[:, None]
            flips = (near_gap < steps) | ((near_gap == steps) & (k < pred[near]))
            delta = np.bincount(
                (near_labels + step_offsets)[flips],
                weights=np.broadcast_to(change, flips.shape)[flips],
                minlength=n_steps * n_classes,
            ).reshape(n_steps, n_classes)
            worst20, total = summaries(correct + delta.astype(np.int64))
            for i in range(n_steps):
                value = (float(worst20[i]), int(total[i]))
                if value > best_value:
                    best_value, best_move = value, (k, _ASCENT_STEPS[i])
        if best_move is None or best_value[0] <= current[0] + _TIE:
            break
        k, step = best_move
        b[k] += step
        gap = best - scores[:, k]
        scores[:, k] += step
        # the raise moves to k exactly the rows it overtakes (as in the trial)
        flips = (gap < step) | ((gap == step) & (k < pred))
        pred[flips] = k
        best[flips] = scores[flips, k]
        correct = np.bincount(labels[pred == labels], minlength=n_classes).astype(np.int64)
        worst20, total = summaries(correct[None])
        current = (float(worst20[0]), int(total[0]))
    return b - b.mean()


_FITTERS = {
    "logit-adjust": _fit_logit_adjust,
    "class-balanced-ce": _on_present_classes(_fit_class_balanced_ce),
    "class-dro": _on_present_classes(_fit_class_dro),
    "prior-match": _on_present_classes(_fit_prior_match),
    "worst20-ascent": _fit_worst20_ascent,
    "temperature": _fit_temperature,
    "vector-scaling": _fit_vector_scaling,
}

#: The methods with a parameter per class, and what a class without validation
#: samples keeps neutral (named in :attr:`MethodFit.warnings`).
_PER_CLASS_METHODS = {
    "logit-adjust": "bias",
    "class-balanced-ce": "bias",
    "class-dro": "bias",
    "prior-match": "bias",
    "worst20-ascent": "bias",
    "vector-scaling": "bias and scale",
}
