"""Does a fitted correction help on new data? Cross-validation on the validation set.

A correction is fitted on the very samples it is then scored on, so its
in-sample accuracy flatters it: on a validation set with a few weak classes
the elaborated fit can raise the weights of those classes so far that total
accuracy on new data falls by 20 points while nothing looks wrong. The check
estimates the effect on new data by stratified k-fold cross-validation (fit on
k-1 folds, score the held-out fold, average over folds, as ``cnnbal sweep``
does for one configuration) and fails when the cross-validated total accuracy
falls more than ``max_total_drop`` percentage points below raw.

The check is generic: ``fit_fn(probs, labels)`` may return any fitted
correction (see :func:`predict`). The elaborated affine fit has a fast path
that computes the per-row work (argmax, competitive set, apply gate) once for
all folds; its held-out predictions are those of refitting (H equal to rounding).
The other methods (:mod:`cnnbal.methods`) are checked by refitting them with
their hyper-parameters fixed (:class:`MethodRefit`); where their own CV chose
the hyper-parameter, :func:`check_from_cv` reads the same estimate from that CV
(it already kept total accuracy within the limit) instead of computing it twice.

Pure functions: no printing, no files; the fold assignment takes a seed.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from cnnbal.core import DEFAULT_PARAMS, FitParams, apply_correction, fit_elaborated
from cnnbal.errors import CnnbalError
from cnnbal.metrics import class_recall, low_fraction_count

__all__ = [
    "CHECK_SCORES",
    "DEFAULT_FOLDS",
    "ElaboratedFit",
    "FitCheck",
    "MethodRefit",
    "check_fit",
    "check_from_cv",
    "fit_function",
    "predict",
]

#: Folds of the check (as ``cnnbal sweep``'s default).
DEFAULT_FOLDS = 5
#: The scores the check reports, raw and corrected (keys of :func:`cnnbal.metrics.summarize`).
CHECK_SCORES = ("total_accuracy", "worst20_accuracy", "balanced_accuracy")
# Two accuracies closer than this are equal (scores are fractions in [0, 1]).
_TIE = 1e-12


@dataclass(frozen=True)
class ElaboratedFit:
    """The elaborated fit with fixed parameters, as a ``fit_fn`` for :func:`check_fit`.

    Calling it is :func:`cnnbal.core.fit_elaborated`; :func:`check_fit`
    recognises it and shares the per-row work across folds instead of
    refitting from scratch on every fold.
    """

    params: FitParams = DEFAULT_PARAMS

    def __call__(self, probs: np.ndarray, labels: np.ndarray):
        return fit_elaborated(probs, labels, self.params)


@dataclass(frozen=True)
class MethodRefit:
    """A method of :mod:`cnnbal.methods` with every hyper-parameter fixed, as a ``fit_fn``.

    Calling it is :func:`cnnbal.methods.fit_method` with ``hyper`` (nothing
    left for an inner CV to choose) and returns the fitted
    :class:`~cnnbal.corrections.Correction`.

    Attributes
    ----------
    method : str
        Not ``elaborated`` / ``naive`` (see :func:`fit_function`).
    hyper : dict of str to float
        A value for every hyper-parameter of the method
        (:data:`cnnbal.methods.HYPERPARAMS`).
    prior : {"uniform", "val"} or ndarray of shape (n_classes,)
        ``prior-match``'s target (``"val"``: the training part's label frequencies).
    """

    method: str
    hyper: dict = field(default_factory=dict)
    prior: object = "uniform"

    def __post_init__(self):
        from cnnbal.methods import HYPERPARAMS

        missing = sorted(set(HYPERPARAMS[self.method]) - set(self.hyper))
        if missing:  # an inner CV in every fold would check another procedure
            raise CnnbalError(f"fit check of {self.method}: no value for {', '.join(missing)}")

    def __call__(self, probs: np.ndarray, labels: np.ndarray):
        from cnnbal.methods import fit_method

        fitted = fit_method(self.method, probs, labels, hyper=dict(self.hyper), prior=self.prior)
        return fitted.correction


def fit_function(
    method: str,
    params: FitParams | None = None,
    *,
    hyper: dict | None = None,
    prior: str | np.ndarray = "uniform",
):
    """The ``fit_fn`` of :func:`check_fit` for a method of :data:`cnnbal.methods.METHOD_NAMES`.

    ``params`` is the elaborated fit's; ``hyper`` and ``prior`` are the other
    methods' (every hyper-parameter given, see :class:`MethodRefit`).
    """
    from cnnbal.core import fit_naive

    if method == "elaborated":
        return ElaboratedFit(params or DEFAULT_PARAMS)
    if method == "naive":
        return fit_naive
    from cnnbal.methods import METHOD_NAMES

    if method not in METHOD_NAMES:
        raise CnnbalError(f"--method: no fit check for method {method!r}")
    return MethodRefit(method, dict(hyper or {}), prior)


@dataclass(frozen=True)
class FitCheck:
    """Raw vs corrected scores of a fit, in-sample and cross-validated.

    Attributes
    ----------
    in_sample : dict of str to (float, float)
        ``score -> (raw, corrected)`` on the whole validation set, corrected by
        the fit on that same set (optimistic). Keys: :data:`CHECK_SCORES`.
    cross_validated : dict of str to (float, float)
        ``score -> (raw, corrected)``: mean over held-out folds of the fits on
        the other folds (an estimate for new data).
    fold_total : ndarray of shape (n_folds, 2)
        Held-out total accuracy per fold, raw and corrected.
    n_folds, seed : int
    max_total_drop : float
        The limit in percentage points.
    passed : bool
        The cross-validated total accuracy is at most ``max_total_drop``
        points below raw.
    skipped : str
        Why no cross-validation was run (too few samples, no labels), else "".
    source : str
        Where the estimate comes from when no check of its own was run (the
        method's CV that chose its hyper-parameter, :func:`check_from_cv`), else "".
    """

    in_sample: dict[str, tuple[float, float]]
    cross_validated: dict[str, tuple[float, float]]
    fold_total: np.ndarray
    n_folds: int
    seed: int
    max_total_drop: float
    passed: bool
    skipped: str = field(default="")
    source: str = field(default="")

    @property
    def total_drop_points(self) -> float:
        """Cross-validated fall of total accuracy, in points (negative: a gain)."""
        raw, corrected = self.cross_validated.get("total_accuracy", (math.nan, math.nan))
        return 100.0 * (raw - corrected)

    def to_dict(self) -> dict:
        """JSON-ready (accuracies as fractions), as stored under ``provenance["fit_check"]``."""

        def pairs(scores: dict) -> dict:
            return {k: {"raw": float(r), "corrected": float(c)} for k, (r, c) in scores.items()}

        out = {
            "n_folds": self.n_folds,
            "seed": self.seed,
            "max_total_drop_points": float(self.max_total_drop),
            "passed": self.passed,
            "in_sample": pairs(self.in_sample),
            "cross_validated": pairs(self.cross_validated),
            "cv_total_drop_points": float(self.total_drop_points),
            "cv_fold_total": [[float(r), float(c)] for r, c in self.fold_total],
        }
        if self.skipped:
            out["skipped"] = self.skipped
        if self.source:
            out["source"] = self.source
        return out

    def summary(self) -> str:
        """One line: the cross-validated total accuracy, raw -> corrected, and the verdict."""
        if self.skipped:
            return f"fit check skipped: {self.skipped}"
        raw, corrected = self.cross_validated["total_accuracy"]
        return (
            f"{self.n_folds}-fold cross-validated total accuracy {100 * raw:.2f}% -> "
            f"{100 * corrected:.2f}% ({-self.total_drop_points:+.2f} points; limit "
            f"--max-total-drop {self.max_total_drop:g})"
        )


def predict(fitted, probs: np.ndarray, raw_pred: np.ndarray | None = None) -> np.ndarray:
    """Predicted classes of ``probs`` corrected by ``fitted``.

    Parameters
    ----------
    fitted : object
        Either has ``apply(probs) -> scores`` (any correction), or ``H`` and
        ``apply_gate`` (an affine :class:`~cnnbal.core.FitResult`, corrected
        as :func:`cnnbal.core.apply_correction` does, docs/method.md 3).
    probs : ndarray of shape (n_samples, n_classes)
    raw_pred : ndarray of shape (n_samples,), optional
        ``probs.argmax(axis=1)`` if the caller has it already.

    Returns
    -------
    ndarray of shape (n_samples,), int64
    """
    apply = getattr(fitted, "apply", None)
    if callable(apply):
        return np.asarray(apply(probs)).argmax(axis=1)
    gate = float(fitted.apply_gate)
    pred = probs.argmax(axis=1) if raw_pred is None else raw_pred.copy()
    if math.isfinite(gate):
        gated = _row_max(probs, pred) < gate
    else:
        gated = np.ones(len(pred), bool)
    if gated.any():  # rows above the gate keep their scores, hence their prediction
        pred[gated] = _corrected_argmax(fitted.H, probs[gated])
    return pred


def _row_max(probs: np.ndarray, argmax: np.ndarray) -> np.ndarray:
    # the maximum is the value at the argmax: a gather instead of a reduction
    # over every column (a tenth of the time at K = 100)
    return probs[np.arange(len(probs)), argmax]


def _corrected_argmax(H: np.ndarray, probs: np.ndarray) -> np.ndarray:
    # clipping and renormalising never change the argmax (docs/method.md 3): skip them
    return apply_correction(H, probs, clip=False).argmax(axis=1)


def check_fit(
    probs: np.ndarray,
    labels: np.ndarray,
    fit_fn: Callable[[np.ndarray, np.ndarray], object],
    *,
    fitted=None,
    n_folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    max_total_drop: float = 0.5,
) -> FitCheck:
    """Estimate what a fit does to new data, by stratified k-fold cross-validation.

    Parameters
    ----------
    probs : ndarray of shape (n_samples, n_classes)
        Validated validation outputs (see :mod:`cnnbal.io`).
    labels : ndarray of shape (n_samples,), int
    fit_fn : callable
        ``fit_fn(probs, labels)`` returns a fitted correction that
        :func:`predict` understands. An :class:`ElaboratedFit` takes the fast
        path (the per-row work shared by the folds, the same predictions).
    fitted : object, optional
        ``fit_fn(probs, labels)`` if the caller has it already (the in-sample
        scores are its own).
    n_folds : int
        Folds of :func:`cnnbal.sweep.stratified_folds`.
    seed : int
        Seed of the fold assignment (>= 0).
    max_total_drop : float
        Percentage points (>= 0; ``inf`` never fails).

    Returns
    -------
    FitCheck
        With ``skipped`` set (and ``passed``) when there are fewer than two
        samples per fold: nothing can be estimated.

    Raises
    ------
    CnnbalError
        A negative ``max_total_drop`` or ``seed``, or fewer than 2 folds.
    """
    from cnnbal.sweep import stratified_folds

    if not max_total_drop >= 0:
        raise CnnbalError(f"--max-total-drop: must be >= 0 points, got {max_total_drop}")
    if int(n_folds) != n_folds or n_folds < 2:
        raise CnnbalError(f"--folds: need at least 2 folds, got {n_folds}")
    if seed < 0:
        raise CnnbalError(f"--seed: must be >= 0, got {seed}")
    labels = np.asarray(labels, dtype=np.int64)
    n_samples, n_classes = probs.shape
    with warnings.catch_warnings(), _one_blas_thread(n_classes):
        warnings.simplefilter("ignore", UserWarning)  # edge cases of a fold's fit
        if fitted is None:
            fitted = fit_fn(probs, labels)
        raw_pred = probs.argmax(axis=1)
        in_sample = _pair(
            _scores(raw_pred, labels, n_classes),
            _scores(predict(fitted, probs, raw_pred), labels, n_classes),
        )
        if n_samples < 2 * n_folds:
            nan = {name: (math.nan, math.nan) for name in CHECK_SCORES}
            return FitCheck(
                in_sample=in_sample,
                cross_validated=nan,
                fold_total=np.empty((0, 2)),
                n_folds=int(n_folds),
                seed=int(seed),
                max_total_drop=float(max_total_drop),
                passed=True,
                skipped=f"{n_samples} samples are too few for {n_folds}-fold cross-validation",
            )
        folds = stratified_folds(labels, n_folds, seed)
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # reported once, below
                raw_folds, corrected_folds = _cross_validate(probs, labels, folds, fit_fn, raw_pred)
        except OverflowError as exc:  # a fold's weights overflow where the whole set's did not
            raise CnnbalError(f"fit check: {exc}") from None
    raw_mean, corrected_mean = raw_folds.mean(axis=0), corrected_folds.mean(axis=0)
    total = CHECK_SCORES.index("total_accuracy")
    passed = bool(corrected_mean[total] >= raw_mean[total] - max_total_drop / 100.0 - _TIE)
    return FitCheck(
        in_sample=in_sample,
        cross_validated=_pair(raw_mean, corrected_mean),
        fold_total=np.stack([raw_folds[:, total], corrected_folds[:, total]], axis=1),
        n_folds=int(n_folds),
        seed=int(seed),
        max_total_drop=float(max_total_drop),
        passed=passed,
    )


def check_from_cv(probs: np.ndarray, labels: np.ndarray, fitted) -> FitCheck:
    """The check of a fit whose hyper-parameter its own CV chose, read from that CV.

    :func:`cnnbal.methods.fit_method` scored every grid value by the same
    stratified folds (:func:`cnnbal.sweep.stratified_folds`, same ``n_folds``
    and ``seed``) that :func:`check_fit` would use, and chose only among values
    within ``max_total_drop``; its mean held-out scores at the chosen value are
    what :func:`check_fit` with :class:`MethodRefit` computes, so they are not
    computed twice. Only the in-sample scores (one prediction) are new.

    Parameters
    ----------
    probs : ndarray of shape (n_samples, n_classes)
    labels : ndarray of shape (n_samples,), int
    fitted : MethodFit
        With ``fitted.cv`` (the CV record) not None.

    Returns
    -------
    FitCheck
        ``fold_total`` is empty (the record keeps means only); ``source`` says
        which CV the estimate is from.
    """
    cv = fitted.cv
    labels = np.asarray(labels, dtype=np.int64)
    n_classes = probs.shape[1]
    raw_pred = probs.argmax(axis=1)
    in_sample = _pair(
        _scores(raw_pred, labels, n_classes),
        _scores(predict(fitted.correction, probs, raw_pred), labels, n_classes),
    )
    raw = np.array([cv["raw_mean_scores"][name] for name in CHECK_SCORES])
    chosen = cv.get("chosen")
    if chosen is None:  # nothing eligible: the identity, which changes nothing
        corrected, source = raw, f"the CV of {cv['name']}: no value eligible, no correction"
    else:
        i = [float(v) for v in cv["grid"]].index(float(chosen))
        corrected = np.array([cv["mean_scores"][name][i] for name in CHECK_SCORES])
        source = f"the CV that chose {cv['name']}={chosen:g}"
    limit = float(cv["max_total_drop"])
    total = CHECK_SCORES.index("total_accuracy")
    return FitCheck(
        in_sample=in_sample,
        cross_validated=_pair(raw, corrected),
        fold_total=np.empty((0, 2)),
        n_folds=int(cv["n_folds"]),
        seed=int(cv["seed"]),
        max_total_drop=limit,
        passed=bool(corrected[total] >= raw[total] - limit / 100.0 - _TIE),
        source=source,
    )


# Up to this many classes the check runs BLAS single-threaded (as the sweep does).
_SINGLE_THREAD_MAX_CLASSES = 512


@contextlib.contextmanager
def _one_blas_thread(n_classes: int) -> Iterator[None]:
    """One BLAS thread for the check's small products and solves.

    Threads only synchronise on products this small; on a busy 2-core machine
    a multi-threaded step stalls for 100 ms or more (docs/method.md 6), which
    made the check cost several fits. Only the BLAS already loaded (numpy's)
    is limited: importing scipy for it would cost more than it saves.
    """
    if n_classes > _SINGLE_THREAD_MAX_CLASSES:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _cross_validate(probs, labels, folds, fit_fn, raw_pred):
    if isinstance(fit_fn, ElaboratedFit):
        return _elaborated_folds(probs, labels, folds, fit_fn.params, raw_pred)
    return _generic_folds(probs, labels, folds, fit_fn)


def _pair(raw: np.ndarray, corrected: np.ndarray) -> dict[str, tuple[float, float]]:
    return {name: (float(raw[j]), float(corrected[j])) for j, name in enumerate(CHECK_SCORES)}


def _scores(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """:data:`CHECK_SCORES` of predictions, as :func:`cnnbal.metrics.summarize` computes them."""
    recall, _ = class_recall(pred, labels, n_classes)
    present = recall[np.isfinite(recall)]
    worst = np.sort(present)[: low_fraction_count(n_classes)]
    return np.array([np.mean(pred == labels), worst.mean(), present.mean()])


def _elaborated_folds(probs, labels, folds, params: FitParams, raw_pred: np.ndarray):
    """Held-out scores of the elaborated fit, sharing the per-row work across folds.

    Whether a row is competitive (docs/method.md 2, step 2), its renormalised float64
    copy, its argmax and its apply gate (docs/method.md 3) do not depend on which
    other rows are in the training part, so they are computed once, and so are
    the per-class sums of the competitive rows of each fold (a training part's
    sums are the total minus its held-out fold's). Per fold remain the training
    accuracies (two bincounts), the Gram product of the competitive training
    rows (:func:`_training_system`, scaled straight from the slices around the
    held-out fold) and the core's (K+1)-square solve. Per (fold, class) Grams
    summed with each fold's weights were measured and rejected: at K = 100 that
    weighted sum reads 5 K (K+1)^2 floats (40 MB) per check and took 8 ms
    against 2 ms for the five Gram products of about 1,000 competitive rows. Each fold's H equals
    ``fit_elaborated(probs[train], labels[train], params).H`` to rounding (the
    same equations; only the order of the class sums differs).
    """
    from cnnbal.core import _add_padding, _floored_accuracy, identity_h, solve_normal_equations

    n_samples, n_classes = probs.shape
    n_folds = len(folds)
    fold_of = np.empty(n_samples, dtype=np.int64)
    for k, (_, test) in enumerate(folds):
        fold_of[test] = k
    # as cnnbal.core._competitive_rows, once for every fold
    sums = probs.sum(axis=1, dtype=np.float64)
    row_max = _row_max(probs, raw_pred)
    true_prob = probs[np.arange(n_samples), labels]
    competitive = (true_prob / sums > params.r_low) & (row_max / sums < params.r_high)
    members = np.flatnonzero(competitive)
    # competitive rows sorted by (fold, class), renormalised in float64: each
    # fold's rows are one slice, so a training part is the two slices around it
    key = fold_of[members] * n_classes + labels[members]
    order = np.argsort(key, kind="stable")
    members, key = members[order], key[order]
    comp_rows = probs[members].astype(np.float64)
    comp_rows /= sums[members, None]
    comp_labels = labels[members]
    fold_start = np.searchsorted(key, np.arange(n_folds + 1) * n_classes)
    # per (fold, class) sums and counts of the competitive rows: one sorted reduction
    fold_class_sums = np.zeros((n_folds * n_classes, n_classes))
    if len(key):
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        fold_class_sums[key[starts]] = np.add.reduceat(comp_rows, starts, axis=0)
    fold_class_sums = fold_class_sums.reshape(n_folds, n_classes, n_classes)
    fold_class_n = np.bincount(key, minlength=n_folds * n_classes).reshape(n_folds, n_classes)
    total_sums, total_n = fold_class_sums.sum(axis=0), fold_class_n.sum(axis=0)

    gated = row_max < params.r_high  # apply_correction's gate, in the input dtype
    right = raw_pred == labels
    raw = np.empty((n_folds, len(CHECK_SCORES)))
    corrected = np.empty_like(raw)
    for k, (train, test) in enumerate(folds):
        # class_accuracy of the training part, from the shared argmax
        counts = np.bincount(labels[train], minlength=n_classes).astype(np.int64)
        correct = np.bincount(labels[train][right[train]], minlength=n_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)
        safe_accuracy = _floored_accuracy(accuracy, counts)[0]
        lo, hi = fold_start[k], fold_start[k + 1]
        if lo > 0 or hi < len(key):
            class_weight_sq = safe_accuracy ** (-2.0 * params.beta)
            gram, rhs = _training_system(
                comp_rows,
                class_weight_sq[comp_labels],
                (lo, hi),
                class_weight_sq,
                total_sums - fold_class_sums[k],
                total_n - fold_class_n[k],
            )
            _add_padding(gram, rhs, params.alpha)
            H = solve_normal_equations(gram, rhs)
        else:  # as fit_elaborated: an empty competitive set gives the identity
            H = identity_h(n_classes)
        test_labels = labels[test]
        pred = raw_pred[test]  # a copy (fancy indexing)
        raw[k] = _scores(pred, test_labels, n_classes)
        through = gated[test]
        if through.any():
            pred[through] = _corrected_argmax(H, probs[test[through]])
        corrected[k] = _scores(pred, test_labels, n_classes)
    return raw, corrected


def _training_system(rows, w_sq, held_out, class_weight_sq, class_sums, class_n):
    """:func:`cnnbal.core._sample_system` of ``rows`` without the slice ``held_out``.

    Parameters
    ----------
    rows : ndarray of shape (n_competitive, n_classes), float64
        Renormalised competitive rows of every fold, each fold one slice.
    w_sq : ndarray of shape (n_competitive,)
        ``s_n^2`` of every row under this training part's class weights.
    held_out : tuple of int
        ``(lo, hi)``: the held-out fold's rows ``rows[lo:hi]``.
    class_weight_sq : ndarray of shape (n_classes,)
    class_sums : ndarray of shape (n_classes, n_classes)
        Sum of the training rows per class.
    class_n : ndarray of shape (n_classes,)
        Training rows per class.

    Returns
    -------
    gram : ndarray of shape (n_classes + 1, n_classes + 1)
    rhs : ndarray of shape (n_classes, n_classes + 1)
        Without the padding. The scaled training rows are written straight
        from the two slices around the held-out fold: no copy of the rows.
    """
    lo, hi = held_out
    n_rows, n_classes = rows.shape
    before, after = slice(0, lo), slice(hi, n_rows)
    s = np.sqrt(w_sq)
    scaled = np.empty((n_rows - (hi - lo), n_classes))
    np.multiply(rows[before], s[before, None], out=scaled[:lo])
    np.multiply(rows[after], s[after, None], out=scaled[lo:])
    gram = np.empty((n_classes + 1, n_classes + 1))
    gram[:n_classes, :n_classes] = scaled.T @ scaled
    col = rows[before].T @ w_sq[before] + rows[after].T @ w_sq[after]
    gram[:n_classes, n_classes] = col
    gram[n_classes, :n_classes] = col
    gram[n_classes, n_classes] = w_sq[before].sum() + w_sq[after].sum()
    rhs = np.empty((n_classes, n_classes + 1))
    rhs[:, :n_classes] = class_sums * class_weight_sq[:, None]
    rhs[:, n_classes] = class_n * class_weight_sq
    return gram, rhs


def _generic_folds(probs, labels, folds, fit_fn):
    """Held-out scores of any ``fit_fn``: refit on every training part."""
    n_classes = probs.shape[1]
    raw = np.empty((len(folds), len(CHECK_SCORES)))
    corrected = np.empty_like(raw)
    for k, (train, test) in enumerate(folds):
        fitted = fit_fn(probs[train], labels[train])
        test_probs, test_labels = probs[test], labels[test]
        raw[k] = _scores(test_probs.argmax(axis=1), test_labels, n_classes)
        corrected[k] = _scores(predict(fitted, test_probs), test_labels, n_classes)
    return raw, corrected
