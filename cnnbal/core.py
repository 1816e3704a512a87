"""The numeric core: fit and apply the output correction H of Choi (2017).

Pure functions on validated arrays (see :mod:`cnnbal.io`): no I/O, no printing.
Every equation cites ``docs/method.md`` (the paper's method restated).

Notation (docs/method.md section 1): ``probs`` is (n_samples, n_classes) softmax
output, ``labels`` the integer true classes, ``pbar_n = [p_n, 1]`` and the
corrected output ``phat_n = H @ pbar_n = W p_n + b`` with ``H = [W b]`` of
shape (n_classes, n_classes + 1).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "DEFAULT_PARAMS",
    "METHODS",
    "FitParams",
    "FitResult",
    "apply_correction",
    "apply_correction_predict",
    "argmax_rows",
    "class_accuracy",
    "competitive_mask",
    "elaborated_class_weight_sq",
    "finish_elaborated",
    "finish_naive",
    "fit",
    "fit_elaborated",
    "fit_naive",
    "identity_h",
    "solve_normal_equations",
]

METHODS = ("elaborated", "naive")
#: |alpha - 1| below this makes the elaborated system (nearly) singular: a warning.
ALPHA_NEAR_ONE = 0.1
#: Cholesky is trusted when its smallest pivot is at least this fraction of the
#: largest (condition number below ~1e8); otherwise minimum-norm least squares.
PIVOT_RATIO_MIN = 1e-4
#: The few-rows route of the elaborated fit is used while sum_n |s_n p_n|^2 / alpha^2
#: (its error amplification, bounded) stays below this.
FEW_ROWS_MAX_GAIN = 1e4


@dataclass(frozen=True)
class FitParams:
    """The four hyper-parameters of the elaborated fit (docs/method.md section 3).

    Attributes
    ----------
    r_low : float
        A validation sample is competitive only if its true-class probability
        exceeds ``r_low``.
    r_high : float
        ... and its largest probability is below ``r_high``. Also the apply gate:
        only outputs whose maximum is below ``r_high`` are corrected.
    beta : float
        Sample weight exponent: ``s_n = acc_{c_n} ** -beta``.
    alpha : float
        Strength of the identity padding rows.
    """

    r_low: float = 0.1
    r_high: float = 0.8
    beta: float = 1.5
    alpha: float = 3.0

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


DEFAULT_PARAMS = FitParams()


@dataclass(frozen=True)
class FitResult:
    """A fitted correction and what a report needs to know about the fit.

    Attributes
    ----------
    H : ndarray of shape (n_classes, n_classes + 1), float64
        The correction ``[W b]``.
    method : {"elaborated", "naive"}
    params : FitParams or None
        The hyper-parameters (None for the naive fit, which has none).
    apply_gate : float
        Apply H only to outputs whose maximum probability is below this value
        (``r_high`` for the elaborated fit, ``inf`` for the naive fit).
    class_accuracy : ndarray of shape (n_classes,)
        Raw per-class validation accuracy (NaN for a class with no samples).
    class_counts : ndarray of shape (n_classes,), int64
        Validation samples per class.
    n_samples : int
        Validation samples used.
    n_competitive : int
        Samples in the competitive set (all samples for the naive fit).
    floored_classes : tuple of int
        Classes whose accuracy was floored at ``0.5 / n_k`` (docs/method.md section 3, edge cases).
    empty_classes : tuple of int
        Classes with no validation samples.
    warnings : tuple of str
        Human-readable notes about edge cases met during the fit.
    """

    H: np.ndarray
    method: str
    params: FitParams | None
    apply_gate: float
    class_accuracy: np.ndarray
    class_counts: np.ndarray
    n_samples: int
    n_competitive: int
    floored_classes: tuple[int, ...] = ()
    empty_classes: tuple[int, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def n_classes(self) -> int:
        return int(self.H.shape[0])


def identity_h(n_classes: int) -> np.ndarray:
    """The correction that changes nothing, ``[I 0]`` of shape (n_classes, n_classes + 1)."""
    return np.hstack([np.eye(n_classes), np.zeros((n_classes, 1))])


def class_accuracy(
    probs: np.ndarray, labels: np.ndarray, n_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class accuracy of the argmax prediction (docs/method.md section 3, step 1).

    Parameters
    ----------
    probs : ndarray of shape (n_samples, n_classes)
    labels : ndarray of shape (n_samples,), int
    n_classes : int, optional
        Defaults to ``probs.shape[1]``.

    Returns
    -------
    accuracy : ndarray of shape (n_classes,), float64
        Fraction of the samples of class k predicted as k; NaN where a class
        has no samples.
    counts : ndarray of shape (n_classes,), int64
    """
    n_classes = probs.shape[1] if n_classes is None else n_classes
    pred = np.argmax(probs, axis=1)
    counts = np.bincount(labels, minlength=n_classes).astype(np.int64)
    correct = np.bincount(labels[pred == labels], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)
    return accuracy, counts


def competitive_mask(
    probs: np.ndarray, labels: np.ndarray, r_low: float, r_high: float
) -> np.ndarray:
    """The competitive set R of docs/method.md section 3, step 2, as a boolean mask.

    ``R = {n : p_n[c_n] > r_low and max_j p_n[j] < r_high}``: the true class
    has a real chance and no class is confident.
    """
    true_prob = probs[np.arange(len(labels)), labels]
    return (true_prob > r_low) & (probs.max(axis=1) < r_high)


def _floored_accuracy(
    accuracy: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """Accuracy floored at half a correct sample, ``max(acc_k, 0.5 / n_k)``.

    A zero accuracy would make the weight ``acc ** -beta`` infinite (the
    reference code crashes); docs/method.md section 3, edge cases. Classes without samples
    get weight 1 (it is never used: they have no sample rows).
    """
    present = counts > 0
    floor = np.where(present, 0.5 / np.maximum(counts, 1), 1.0)
    floored = present & (accuracy < floor)
    safe = np.where(present, np.maximum(np.nan_to_num(accuracy, nan=1.0), floor), 1.0)
    return (
        safe,
        tuple(int(k) for k in np.flatnonzero(floored)),
        tuple(int(k) for k in np.flatnonzero(~present)),
    )


def _as_float64_rows(probs: np.ndarray) -> np.ndarray:
    """Probabilities in float64 with each row renormalised to sum to 1.

    Saved float32 rows sum to 1 only within ~1e-7; renormalising in float64
    makes the appended 1 exactly the row sum, which keeps the naive fit's
    minimum-norm solution away from fitting rounding noise (docs/method.md section 7.2).
    """
    p = np.array(probs, dtype=np.float64, copy=True)
    p /= p.sum(axis=1, keepdims=True)
    return p


def solve_normal_equations(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``H @ gram = rhs`` for H with gram symmetric positive semi-definite.

    Cholesky when ``gram`` is positive definite (the elaborated system
    normally is: docs/method.md section 7.1); otherwise the minimum-norm least-squares
    solution of the normal equations, which is the minimum-norm solution of
    the stacked rows because both share the same null space.

    Parameters
    ----------
    gram : ndarray of shape (n_classes + 1, n_classes + 1)
        ``X^T X`` of the stacked rows.
    rhs : ndarray of shape (n_classes, n_classes + 1)
        ``T^T X`` of the stacked rows.

    Returns
    -------
    H : ndarray of shape (n_classes, n_classes + 1)

    Raises
    ------
    OverflowError
        The equations hold inf or NaN (weights ``acc ** -beta`` or ``alpha ** 2``
        beyond float64): no solver gives a meaningful H, and LAPACK may not
        even return.
    """
    if not (np.isfinite(gram).all() and np.isfinite(rhs).all()):
        raise OverflowError(
            "the fit overflows float64: the sample weights acc**(-2 beta) or alpha**2 are too "
            "large (lower --beta or --alpha)"
        )
    with _one_blas_thread(len(gram)):
        return _solve_normal_equations(gram, rhs)


#: From this size on, the solve runs on one BLAS thread (see _one_blas_thread).
_ONE_THREAD_FROM = 256


@contextlib.contextmanager
def _one_blas_thread(size: int):
    """One BLAS thread for the (K+1)-square factorisation and solve of a large K.

    A multi-threaded Cholesky of a 1001 x 1001 matrix took 85-1,300 ms on a busy
    2-core machine against 12-22 ms on one thread (docs/method.md section 7.1 reports the same on
    small solves); the factorisation is too small to gain from threads. Small
    systems skip threadpoolctl and its import altogether.
    """
    if size < _ONE_THREAD_FROM:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _solve_normal_equations(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    # numpy only: importing scipy.linalg costs ~0.1-0.2 s of CLI start-up, and
    # its OpenBLAS fights numpy's over the cores on small solves (docs/method.md section 7.1).
    try:
        factor = np.linalg.cholesky(gram)
        # A near-singular gram factorises but amplifies rounding: check the
        # diagonal of the factor against the scale of the problem. A pivot
        # ratio of 1e-4 bounds the condition number near 1e8 (solution good to
        # ~1e-8). The elaborated system reaches it only with alpha within ~1e-2
        # of 1, where every row, padding included, is orthogonal to
        # [1, ..., 1, -alpha] and the system is singular (pivot ratios on real
        # CIFAR outputs at alpha = 3: 0.02-0.6).
        diag = np.abs(np.diag(factor))
        if diag.min() > PIVOT_RATIO_MIN * diag.max():
            # numpy has no triangular solve; LU on the well-conditioned gram
            # costs about the same and is as exact.
            return np.linalg.solve(gram, rhs.T).T
    except np.linalg.LinAlgError:
        pass
    solution, *_ = np.linalg.lstsq(gram, rhs.T, rcond=None)
    return solution.T


def fit_elaborated(
    probs: np.ndarray,
    labels: np.ndarray,
    params: FitParams = DEFAULT_PARAMS,
    *,
    n_classes: int | None = None,
) -> FitResult:
    """The elaborated fit of Choi (2017), docs/method.md section 3 (the default method).

    Weighted least squares over the competitive validation samples, with
    sample weight ``s_n = acc_{c_n} ** -beta`` applied to the rows (so the
    squared loss is weighted by ``s_n ** 2``, as in the reference code), plus
    one identity padding row per class, ``x = [alpha e_k, 1]``,
    ``t = alpha e_k``. Solved through the (K+1) x (K+1) normal equations, or,
    when there are fewer competitive rows than classes (large K), through the
    same equations reduced to the competitive rows (:func:`_solve_few_rows`).

    Parameters
    ----------
    probs : ndarray of shape (n_samples, n_classes)
        Validation softmax outputs (validated: finite, non-negative, rows sum to 1).
    labels : ndarray of shape (n_samples,), int
        True classes in ``[0, n_classes)``.
    params : FitParams
        ``r_low, r_high, beta, alpha``; the paper's values by default.
    n_classes : int, optional
        Defaults to ``probs.shape[1]``.

    Returns
    -------
    FitResult
        With ``apply_gate = params.r_high``. An empty competitive set gives the
        identity ``[I 0]`` and a warning.
    """
    n_classes = probs.shape[1] if n_classes is None else n_classes
    labels = np.asarray(labels, dtype=np.int64)
    # argmax is unchanged by renormalising a row, so accuracy reads the input as is
    accuracy, counts = class_accuracy(probs, labels, n_classes)
    p, competitive_labels = _competitive_rows(probs, labels, params.r_low, params.r_high)
    class_weight_sq = elaborated_class_weight_sq(accuracy, counts, params.beta)
    H = None
    if 0 < len(competitive_labels) <= n_classes and abs(params.alpha - 1.0) >= ALPHA_NEAR_ONE:
        H = _solve_few_rows(p, competitive_labels, class_weight_sq, params.alpha)
    gram = rhs = None
    if H is None and len(competitive_labels):
        gram, rhs = _sample_system(
            p, competitive_labels, class_weight_sq, n_classes, overwrite=True
        )
    return finish_elaborated(accuracy, counts, gram, rhs, len(competitive_labels), params, H=H)


def elaborated_class_weight_sq(accuracy: np.ndarray, counts: np.ndarray, beta: float) -> np.ndarray:
    """Squared class weights ``s_k^2 = max(acc_k, 0.5 / n_k) ** (-2 beta)``.

    docs/method.md section 3, step 3 (the floor: its edge cases).

    Parameters
    ----------
    accuracy, counts : ndarray of shape (n_classes,)
        From :func:`class_accuracy` over ALL validation samples.
    beta : float

    Returns
    -------
    ndarray of shape (n_classes,), float64
        1 for a class without samples (it has no rows, so the weight is unused).
    """
    safe_accuracy, _, _ = _floored_accuracy(accuracy, counts)
    return safe_accuracy ** (-2.0 * beta)


def finish_elaborated(
    accuracy: np.ndarray,
    counts: np.ndarray,
    gram: np.ndarray | None,
    rhs: np.ndarray | None,
    n_competitive: int,
    params: FitParams,
    *,
    H: np.ndarray | None = None,
) -> FitResult:
    """Solve the elaborated system from the sample rows' sums and wrap the result.

    Parameters
    ----------
    accuracy, counts : ndarray of shape (n_classes,)
        Per-class validation accuracy and counts (all samples).
    gram : ndarray of shape (n_classes + 1, n_classes + 1) or None
        ``sum s_n^2 pbar_n pbar_n^T`` over the competitive rows, without the
        padding rows (added here, in place). None when ``H`` is given or the
        competitive set is empty.
    rhs : ndarray of shape (n_classes, n_classes + 1) or None
        ``sum s_n^2 e_{c_n} pbar_n^T`` over the competitive rows.
    n_competitive : int
    params : FitParams
    H : ndarray of shape (n_classes, n_classes + 1), optional
        Already solved (the few-rows route of :func:`fit_elaborated`).

    Returns
    -------
    FitResult
    """
    n_classes = len(counts)
    _, floored, empty = _floored_accuracy(accuracy, counts)
    notes = _class_notes(floored, empty, counts)
    if abs(params.alpha - 1.0) < ALPHA_NEAR_ONE:
        notes.append(
            f"alpha={params.alpha:g} is close to 1: every row, padding included, is then nearly "
            "orthogonal to [1, ..., 1, -alpha], the system is (nearly) singular and H unstable; "
            "use alpha >= 1.1"
        )
    if n_competitive == 0:
        notes.append("the competitive set is empty: H is the identity [I 0]")
        H = identity_h(n_classes)
    elif H is None:
        _add_padding(gram, rhs, params.alpha)
        H = solve_normal_equations(gram, rhs)
    _emit(notes)
    return FitResult(
        H=H,
        method="elaborated",
        params=params,
        apply_gate=float(params.r_high),
        class_accuracy=accuracy,
        class_counts=counts,
        n_samples=int(counts.sum()),
        n_competitive=int(n_competitive),
        floored_classes=floored,
        empty_classes=empty,
        warnings=tuple(notes),
    )


def _competitive_rows(
    probs: np.ndarray, labels: np.ndarray, r_low: float, r_high: float
) -> tuple[np.ndarray, np.ndarray]:
    """Competitive rows (docs/method.md section 3, step 2), renormalised in float64; labels.

    Equal to ``_as_float64_rows(probs)[competitive_mask(...)]`` but converts only
    the competitive rows: the tests need just two numbers per row (true-class
    and largest probability, divided by the row sum), and a float64 copy of
    every row costs more than the Gram product at N=50,000, K=1,000.
    """
    sums = probs.sum(axis=1, dtype=np.float64)
    true_prob = probs[np.arange(len(labels)), labels] / sums
    top = probs.max(axis=1) / sums
    mask = (true_prob > r_low) & (top < r_high)
    rows = probs[mask].astype(np.float64)
    rows /= sums[mask, None]
    return rows, labels[mask]


def _elaborated_system(
    p: np.ndarray,
    labels: np.ndarray,
    class_weight_sq: np.ndarray,
    alpha: float,
    n_classes: int,
    *,
    overwrite: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations ``gram = X^T X`` and ``rhs = T^T X`` of docs/method.md section 3, step 4.

    Built without materialising the stacked rows: the sample rows contribute
    ``sum s_n^2 pbar_n pbar_n^T`` and ``sum s_n^2 e_{c_n} pbar_n^T``
    (:func:`_sample_system`), the padding rows
    ``[[alpha^2 I, alpha 1], [alpha 1^T, K]]`` and ``[alpha^2 I, alpha 1]``
    (:func:`_add_padding`). With ``overwrite`` the rows ``p`` are scaled in
    place (saves a copy the size of the competitive set).
    """
    gram, rhs = _sample_system(p, labels, class_weight_sq, n_classes, overwrite=overwrite)
    _add_padding(gram, rhs, alpha)
    return gram, rhs


def _sample_system(
    p: np.ndarray,
    labels: np.ndarray,
    class_weight_sq: np.ndarray | None,
    n_classes: int,
    *,
    overwrite: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The sample rows' share of the normal equations: plain sums, so chunks add up.

    ``gram = sum_n s_n^2 pbar_n pbar_n^T`` of shape (K+1, K+1) and
    ``rhs = sum_n s_n^2 e_{c_n} pbar_n^T`` of shape (K, K+1), with
    ``s_n^2 = class_weight_sq[c_n]`` (all ones when ``class_weight_sq`` is None:
    the naive fit's unweighted system).
    """
    if class_weight_sq is None:
        class_weight_sq = np.ones(n_classes)
    w_sq = class_weight_sq[labels]  # s_n^2, one per sample row
    gram = np.empty((n_classes + 1, n_classes + 1))
    col = p.T @ w_sq  # sum s_n^2 p_n
    gram[:n_classes, n_classes] = col
    gram[n_classes, :n_classes] = col
    gram[n_classes, n_classes] = w_sq.sum()

    # rhs[c] = s_c^2 * sum over the samples of class c of pbar_n
    class_sums = _sum_by_class(p, labels, n_classes)
    class_n = np.bincount(labels, minlength=n_classes)
    rhs = np.empty((n_classes, n_classes + 1))
    rhs[:, :n_classes] = class_sums * class_weight_sq[:, None]
    rhs[:, n_classes] = class_n * class_weight_sq

    scaled = p if overwrite else p.copy()
    scaled *= np.sqrt(w_sq)[:, None]  # rows s_n p_n
    gram[:n_classes, :n_classes] = scaled.T @ scaled
    return gram, rhs


def _add_padding(gram: np.ndarray, rhs: np.ndarray, alpha: float) -> None:
    """Add the K identity padding rows ``x = [alpha e_k, 1]``, ``t = alpha e_k`` in place."""
    n_classes = rhs.shape[0]
    diag = np.arange(n_classes)
    gram[diag, diag] += alpha * alpha
    gram[:n_classes, n_classes] += alpha
    gram[n_classes, :n_classes] += alpha
    gram[n_classes, n_classes] += n_classes
    rhs[diag, diag] += alpha * alpha
    rhs[:, n_classes] += alpha


def _solve_few_rows(
    p: np.ndarray, labels: np.ndarray, class_weight_sq: np.ndarray, alpha: float
) -> np.ndarray | None:
    """The elaborated H when the competitive rows are fewer than the classes (large K).

    Solves exactly the equations of :func:`_elaborated_system`, ``H gram = rhs``,
    without forming or factorising the (K+1)-square gram: with ``Z`` the
    weighted rows ``s_n p_n`` (n_competitive x K) and ``a = alpha^2``, the
    top-left block ``G11 = a I + Z^T Z`` is inverted through the
    n_competitive-square matrix ``M = a I + Z Z^T`` (Woodbury), and the last
    row and column through the scalar Schur complement ``g_KK - g^T G11^-1 g``.
    The cost is one (K x n) by (n x K) product and O(n^2 K), against
    O(n K^2 + K^3) for the gram and its factorisation (K = 10,000, n = 3,000:
    seconds instead of minutes).

    Returns None when the Schur complement is tiny (alpha close to 1, a
    nearly singular system): the caller then takes the gram route with its
    checks and least-squares fallback.
    """
    n_rows, n_classes = p.shape
    a = alpha * alpha
    s = np.sqrt(class_weight_sq[labels])  # s_n
    Z = p * s[:, None]  # rows s_n p_n
    Q = Z @ Z.T  # (n, n)
    # (a I + Z Z^T) and the cancellation in (b - Z^T y) / a lose about
    # log10(|Z|^2 / a) digits; past 1e4 (heavy weights from floored
    # accuracies, or a small alpha) the gram route is the accurate one.
    if np.trace(Q) > FEW_ROWS_MAX_GAIN * a:
        return None
    M = Q.copy()
    M[np.diag_indices(n_rows)] += a  # a I + PSD: positive definite, condition <= 1 + |Z|^2 / a

    present, member_index = np.unique(labels, return_inverse=True)
    # S = sum_n s_n^2 e_{c_n} p_n^T, nonzero only on the rows of classes present
    S_rows = _sum_by_class(Z * s[:, None], member_index, len(present))  # (n_present, K)
    weight_sums = np.bincount(member_index, weights=s * s)  # sum s_n^2 per present class
    g = Z.T @ s + alpha  # gram[:K, K]
    g_kk = float(s @ s) + n_classes  # gram[K, K]

    # B = R1 Z^T with R1 = a I + S; S Z^T = Ew^T (Z Z^T), Ew[n, c_n] = s_n
    B = a * Z.T  # (K, n)
    B[present] += _sum_by_class(Q * s[:, None], member_index, len(present))
    C = np.linalg.solve(M, B.T).T  # B M^-1, (K, n)
    Zg = Z @ g
    u = (g - Z.T @ np.linalg.solve(M, Zg)) / a  # G11^-1 g
    schur = g_kk - float(g @ u)
    if not schur > PIVOT_RATIO_MIN**2 * g_kk:
        return None
    R1u = a * u
    R1u[present] += S_rows @ u
    r2 = np.full(n_classes, alpha)
    r2[present] += weight_sums
    h_last = (r2 - R1u) / schur

    H = np.empty((n_classes, n_classes + 1))
    W = H[:, :n_classes]
    np.matmul(C, Z, out=W)  # C Z = R1 Z^T M^-1 Z
    np.negative(W, out=W)
    W[present] += S_rows
    W[np.diag_indices(n_classes)] += a
    W /= a  # R1 G11^-1 = (R1 - R1 Z^T M^-1 Z) / a
    W -= np.outer(h_last, u)
    H[:, n_classes] = h_last
    return H


def _sum_by_class(rows: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Sum of ``rows`` per label, shape (n_classes, rows.shape[1]); O(n) via a sort."""
    out = np.zeros((n_classes, rows.shape[1]))
    if len(labels) == 0:
        return out
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    bounds = np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1
    # One gather and sum per class: 4-6x faster than gathering all rows in
    # class order and np.add.reduceat (N=35,000 x K=1,000: 45 ms vs 200-380 ms).
    for members in np.split(order, bounds):
        out[labels[members[0]]] = rows[members].sum(axis=0)
    return out


def fit_naive(probs: np.ndarray, labels: np.ndarray, *, n_classes: int | None = None) -> FitResult:
    """The naive fit, docs/method.md section 2: plain least squares over all samples.

    ``min_H sum_n ||H pbar_n - e_{c_n}||^2`` with the minimum-norm solution
    (the system is singular: the appended 1 equals the row sum). Computed
    exactly as docs/method.md section 7.3 describes: the minimum-norm fit ``W0`` without the
    constant column, then ``b = W0 1 / (K + 1)`` and ``W = W0 - b 1^T``.
    ``W0`` comes from the K-square normal equations ``W0 (P^T P) = T^T P``
    when there are at least as many samples as classes, else from the
    n-square ``W0 = T^T (P P^T)^-1 P`` (the minimum-norm solution of an
    under-determined system); a singular system falls back to least squares
    on it, which keeps the minimum-norm solution.

    Parameters
    ----------
    probs : ndarray of shape (n_samples, n_classes)
    labels : ndarray of shape (n_samples,), int

    Returns
    -------
    FitResult
        With ``apply_gate = inf`` (every sample is corrected) and ``params=None``.
    """
    n_classes = probs.shape[1] if n_classes is None else n_classes
    labels = np.asarray(labels, dtype=np.int64)
    p = _as_float64_rows(probs)
    accuracy, counts = class_accuracy(p, labels, n_classes)
    if len(labels) >= n_classes:
        gram, rhs = _sample_system(p, labels, None, n_classes, overwrite=True)
        return finish_naive(accuracy, counts, gram, rhs)
    with _one_blas_thread(len(labels)):
        outer = p @ p.T  # (n, n)
        inv_p = _solve_min_norm(outer, p)  # (P P^T)^+ P
    w0 = _sum_by_class(inv_p, labels, n_classes)  # T^T (P P^T)^+ P
    return _naive_result(w0, accuracy, counts)


def finish_naive(
    accuracy: np.ndarray, counts: np.ndarray, gram: np.ndarray, rhs: np.ndarray
) -> FitResult:
    """Solve the naive system from its sums (see :func:`fit_naive`) and wrap the result.

    Parameters
    ----------
    accuracy, counts : ndarray of shape (n_classes,)
    gram : ndarray of shape (n_classes + 1, n_classes + 1)
        ``sum pbar_n pbar_n^T`` over all samples (rows renormalised in float64);
        only the top-left K x K block is used (docs/method.md section 7.3).
    rhs : ndarray of shape (n_classes, n_classes + 1)
        ``sum e_{c_n} pbar_n^T``.
    """
    n_classes = len(counts)
    with _one_blas_thread(n_classes):
        w0 = _solve_min_norm(gram[:n_classes, :n_classes], rhs[:, :n_classes].T).T
    return _naive_result(w0, accuracy, counts)


def _solve_min_norm(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``gram^+ rhs`` for a symmetric positive semi-definite ``gram``.

    Cholesky-checked solve when ``gram`` is well conditioned (the pivot test
    of :func:`solve_normal_equations`), else least squares with singular values
    below 1e-12 of the largest treated as zero: a gram formed in floating point
    carries rounding of about 1e-16 of its largest eigenvalue on its null space,
    which a smaller cut-off would invert.
    """
    try:
        diag = np.abs(np.diag(np.linalg.cholesky(gram)))
        if diag.min() > PIVOT_RATIO_MIN * diag.max():
            return np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        pass
    solution, *_ = np.linalg.lstsq(gram, rhs, rcond=1e-12)
    return solution


def _naive_result(w0: np.ndarray, accuracy: np.ndarray, counts: np.ndarray) -> FitResult:
    n_classes = len(counts)
    empty = _floored_accuracy(accuracy, counts)[2]
    notes = _class_notes((), empty, counts)
    b = w0.sum(axis=1) / (n_classes + 1)
    H = np.empty((n_classes, n_classes + 1))
    np.subtract(w0, b[:, None], out=H[:, :n_classes])
    H[:, n_classes] = b
    _emit(notes)
    return FitResult(
        H=H,
        method="naive",
        params=None,
        apply_gate=float("inf"),
        class_accuracy=accuracy,
        class_counts=counts,
        n_samples=int(counts.sum()),
        n_competitive=int(counts.sum()),
        floored_classes=(),
        empty_classes=empty,
        warnings=tuple(notes),
    )


def fit(
    probs: np.ndarray,
    labels: np.ndarray,
    method: str = "elaborated",
    params: FitParams = DEFAULT_PARAMS,
    *,
    n_classes: int | None = None,
) -> FitResult:
    """Fit H by ``method`` ("elaborated", the default, or "naive")."""
    if method == "elaborated":
        return fit_elaborated(probs, labels, params, n_classes=n_classes)
    if method == "naive":
        return fit_naive(probs, labels, n_classes=n_classes)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def apply_correction(
    H: np.ndarray,
    probs: np.ndarray,
    gate: float = float("inf"),
    *,
    clip: bool = True,
    row_max: np.ndarray | None = None,
) -> np.ndarray:
    """Correct outputs with H, docs/method.md section 4.

    Rows whose maximum is below ``gate`` become ``W p + b``; the others are
    returned bit for bit as they came. Computed in float32 for float32 input
    (fast, and the precision of the input), else float64, in blocks of rows
    that stay in the CPU cache (:mod:`cnnbal.kernels`). The result has the
    memory layout of ``probs``: a column-major input (one contiguous array per
    class, as read from a table of K columns) gives a column-major output, so
    no step transposes a large array.

    Parameters
    ----------
    H : ndarray of shape (n_classes, n_classes + 1)
    probs : ndarray of shape (n_samples, n_classes)
    gate : float
        ``r_high`` for an elaborated H, ``inf`` for a naive one.
    clip : bool
        Clip negative scores to 0 and renormalise each row to sum to 1; the
        argmax never changes. ``False`` returns the raw affine scores (they
        still sum to 1 when the input rows do, but may be negative).
    row_max : ndarray of shape (n_samples,), optional
        ``probs.max(axis=1)`` if the caller has it already.

    Returns
    -------
    ndarray of shape (n_samples, n_classes)
    """
    return _affine(H, probs, gate, clip=clip, row_max=row_max, predict=False).corrected


def apply_correction_predict(
    H: np.ndarray,
    probs: np.ndarray,
    gate: float = float("inf"),
    *,
    clip: bool = True,
    row_max: np.ndarray | None = None,
):
    """:func:`apply_correction` and the argmax of each corrected row, in one sweep.

    What ``apply`` needs: the corrected rows, their predictions, and whether
    every row came out finite, without a further pass over the result for each.

    Returns
    -------
    cnnbal.kernels.AffineResult
        ``corrected``, ``pred`` (int64, first maximum wins) and
        ``first_nonfinite`` (the first row with a NaN or inf score, or None).
    """
    return _affine(H, probs, gate, clip=clip, row_max=row_max, predict=True)


def _affine(H, probs, gate, *, clip, row_max, predict):
    from cnnbal.kernels import MAX_BLOCKED_CLASSES, AffineResult, affine_blocks

    dtype = np.float32 if probs.dtype == np.float32 else np.float64
    probs = np.asarray(probs, dtype=dtype)
    W = H[:, :-1].astype(dtype)
    b = H[:, -1].astype(dtype)
    if probs.ndim == 2 and 0 < probs.shape[1] <= MAX_BLOCKED_CLASSES:
        return affine_blocks(W, b, probs, gate, clip=clip, row_max=row_max, predict=predict)
    # large K: one product over the whole array is what BLAS does best
    with np.errstate(over="ignore", invalid="ignore"):  # reported in the result
        result = _affine_whole(W, b, probs, gate, clip=clip, row_max=row_max)
    bad = ~np.isfinite(result).all(axis=1)
    first = int(np.flatnonzero(bad)[0]) if bad.any() else None
    return AffineResult(result, argmax_rows(result) if predict else None, first)


def _affine_whole(W, b, probs, gate, *, clip, row_max):
    if probs.flags.f_contiguous and not probs.flags.c_contiguous:
        # (W @ P^T)^T: both operands contiguous, the result column-major
        result = np.matmul(W, probs.T).T
    else:
        result = np.matmul(probs, W.T)
    result += b
    if clip:
        np.maximum(result, 0, out=result)
        sums = result.sum(axis=1, keepdims=True)
        # A row of all non-positive scores cannot happen for rows summing to 1,
        # but guard the division anyway (a plain divide is 2x faster than a
        # masked one, so mask only when needed).
        positive = sums > 0
        if positive.all():
            np.divide(result, sums, out=result)
        else:
            np.divide(result, sums, out=result, where=positive)
    if np.isfinite(gate):
        # rows at or above the gate are returned bit for bit as they came
        keep = (probs.max(axis=1) if row_max is None else row_max) >= gate
        if keep.any():
            # result * 0 + probs * 1 and result * 1 + probs * 0 are exact (all
            # finite), and 4x faster than a masked copy (np.copyto(where=...))
            keep_f = keep.astype(W.dtype)[:, None]
            result *= 1 - keep_f
            result += probs * keep_f
    return result


def argmax_rows(scores: np.ndarray) -> np.ndarray:
    """``scores.argmax(axis=1)`` (first maximum wins) for any memory layout.

    numpy's argmax along rows of a column-major array copies the whole array
    first (10x slower); here the classes are scanned one contiguous column at
    a time instead.

    Parameters
    ----------
    scores : ndarray of shape (n_samples, n_classes)

    Returns
    -------
    ndarray of shape (n_samples,), int64
    """
    if not (scores.flags.f_contiguous and not scores.flags.c_contiguous):
        return scores.argmax(axis=1)
    columns = scores.T  # (n_classes, n_samples), C-contiguous
    best = columns[0].copy()
    index = np.zeros(len(best), dtype=np.int64)
    better = np.empty(len(best), dtype=bool)
    for k in range(1, len(columns)):
        np.greater(columns[k], best, out=better)
        np.copyto(index, k, where=better)
        np.maximum(best, columns[k], out=best)
    return index


def _class_notes(floored: tuple[int, ...], empty: tuple[int, ...], counts: np.ndarray) -> list[str]:
    notes = []
    if floored:
        notes.append(
            f"{len(floored)} class(es) with zero validation accuracy; accuracy floored at "
            f"0.5/n_k for the weights: {_class_list(floored)}"
        )
    if empty:
        notes.append(f"{len(empty)} class(es) with no validation samples: {_class_list(empty)}")
    return notes


def _class_list(classes: tuple[int, ...], limit: int = 10) -> str:
    shown = ", ".join(str(k) for k in classes[:limit])
    return shown + (f" ... (+{len(classes) - limit})" if len(classes) > limit else "")


def _emit(notes: list[str]) -> None:
    # Python-level warnings let API users filter them; the CLI shows them from
    # FitResult.warnings instead, so it silences these.
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)
