"""Choose ``r_low, r_high, beta, alpha`` by stratified k-fold cross-validation.

The paper tuned its four hyper-parameters on test results (its Figure 3, one
parameter varied at a time around ``(0.1, 0.8, 1.5, 3)``; docs/method.md section 6). Here
they are chosen on the validation set only: fit H on k-1 folds, score the
corrected outputs of the held-out fold, average over folds, and pick the
configuration with the best mean objective among those whose cross-validated
total accuracy stays within ``max_total_drop`` points of the raw outputs.

The sweep is many fits of the same data, so the work is shared (all exact,
the same equations as :func:`cnnbal.core.fit_elaborated`):

- per fold: the float64 renormalised rows, the per-class accuracies and their
  floors (docs/method.md section 3, steps 1 and 3 edge cases) and the held-out class set of
  ``low20_val``;
- per fold and ``(r_low, r_high)``: the competitive set (docs/method.md section 3, step 2)
  and the held-out rows the apply gate lets through (docs/method.md section 4);
- per fold, ``(r_low, r_high)`` and ``beta``: the sample part of the normal
  equations, one ``(P_R s)^T (P_R s)`` product;
- per ``alpha``: only the padding rows change (they add to the diagonal and to
  the last row and column), so an alpha costs a copy and a Cholesky solve
  (LAPACK ``potrf``/``potrs``, the core's conditioning test and fallback);
- held-out predictions change only on the gated rows (max probability below
  ``r_high``); only those are corrected.

Pure functions: no printing, no files; randomness takes a seed; progress is an
optional callback.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from cnnbal.core import (
    ALPHA_NEAR_ONE,
    PIVOT_RATIO_MIN,
    FitParams,
    _as_float64_rows,
    _floored_accuracy,
    apply_correction,
    class_accuracy,
    identity_h,
    solve_normal_equations,
)
from cnnbal.errors import CnnbalError
from cnnbal.metrics import low_fraction_count, lowest_classes

__all__ = [
    "DEFAULT_CENTER",
    "DEFAULT_GRID",
    "DEFAULT_MAX_TOTAL_DROP",
    "OBJECTIVES",
    "PARAM_NAMES",
    "SCORE_NAMES",
    "Choice",
    "SweepResult",
    "choose",
    "curve_configs",
    "grid_configs",
    "run_sweep",
    "stratified_folds",
]

#: The four hyper-parameters, in the order of :class:`~cnnbal.core.FitParams`.
PARAM_NAMES = ("r_low", "r_high", "beta", "alpha")
#: Default values swept per parameter (the paper's values in the middle).
DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "r_low": (0.05, 0.1, 0.15),
    "r_high": (0.7, 0.8, 0.9),
    "beta": (1.0, 1.5, 2.0),
    "alpha": (2.0, 3.0, 4.0),
}
#: The paper's values, the centre of its one-at-a-time curves (Figure 3).
DEFAULT_CENTER = FitParams()
#: Default eligibility limit: cross-validated total accuracy may fall at most
#: this many percentage points below raw.
DEFAULT_MAX_TOTAL_DROP = 0.5
#: The scores computed on every held-out fold (keys of :func:`cnnbal.metrics.summarize`).
SCORE_NAMES = (
    "total_accuracy",
    "worst20_accuracy",
    "balanced_accuracy",
    "low20_val_accuracy",
)
#: Objective names (the CLI's ``--objective``) and the score each maximises
#: (docs/method.md section 5). ``low20_val`` picks its classes by the training folds'
#: accuracies, so the held-out fold plays no part in the choice of classes.
OBJECTIVES: dict[str, str] = {
    "worst20": "worst20_accuracy",
    "low20_val": "low20_val_accuracy",
    "balanced": "balanced_accuracy",
    "total": "total_accuracy",
}

# Up to this many classes the sweep runs BLAS single-threaded (see _small_blas_threads).
_SINGLE_THREAD_MAX_CLASSES = 512
# _solve takes its fast path only this far inside the core's conditioning threshold.
_CORE_MARGIN = 10.0
# |alpha - 1| below this makes the elaborated system (nearly) singular: warn.
_ALPHA_NEAR_ONE = ALPHA_NEAR_ONE
# Two means closer than this are a tie (scores are fractions in [0, 1]).
_TIE = 1e-12

ProgressCallback = Callable[[int, int], None]


# ---------------------------------------------------------------- folds and configurations


def stratified_folds(
    labels: np.ndarray, n_folds: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split sample indices into ``n_folds`` stratified folds.

    The samples of each class are shuffled (by ``seed``) and dealt round-robin
    to the folds, each class starting where the previous one stopped, so every
    class is split as evenly as possible (fold counts differ by at most one)
    and so are the fold sizes. A class with fewer samples than folds is
    allowed: some held-out folds then lack it.

    Parameters
    ----------
    labels : ndarray of shape (n_samples,), int
    n_folds : int
        At least 2 and at most ``n_samples`` (so that every fold is non-empty).
    seed : int
        Seed of :func:`numpy.random.default_rng`; the same seed gives the same folds.

    Returns
    -------
    list of (train_idx, test_idx)
        ``n_folds`` pairs of sorted int64 index arrays; the ``test_idx`` are
        disjoint and cover ``range(n_samples)``, ``train_idx`` is the rest.

    Raises
    ------
    CnnbalError
        ``n_folds < 2`` or more folds than samples.
    """
    labels = np.asarray(labels)
    n_samples = len(labels)
    if int(n_folds) != n_folds or n_folds < 2:
        raise CnnbalError(f"--folds: need at least 2 folds, got {n_folds}")
    n_folds = int(n_folds)
    if n_folds > n_samples:
        raise CnnbalError(f"--folds: {n_folds} folds for only {n_samples} samples")
    # order by class, randomly within a class; then deal each class round-robin,
    # starting at the fold where the previous class stopped
    order = np.lexsort((np.random.default_rng(seed).random(n_samples), labels))
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    position = np.arange(n_samples) - np.repeat(starts, counts)
    first_fold = np.repeat((np.cumsum(counts) - counts) % n_folds, counts)
    fold_of = np.empty(n_samples, dtype=np.int64)
    fold_of[order] = (first_fold + position) % n_folds
    everything = np.arange(n_samples)
    return [(everything[fold_of != k], everything[fold_of == k]) for k in range(n_folds)]


def _check_values(name: str, values: Iterable[float]) -> tuple[float, ...]:
    """Sorted, de-duplicated, range-checked values of one hyper-parameter."""
    values = [float(v) for v in values]
    if not values:
        raise CnnbalError(f"--{name.replace('_', '-')}: no values")
    flag = f"--{name.replace('_', '-')}"
    for v in values:
        if not math.isfinite(v):
            raise CnnbalError(f"{flag}: {v} is not a finite number")
        if name == "r_low" and not 0.0 <= v < 1.0:
            raise CnnbalError(f"{flag}: {v:g} is outside [0, 1) (a probability threshold)")
        if name == "r_high" and not 0.0 < v <= 1.0:
            raise CnnbalError(f"{flag}: {v:g} is outside (0, 1] (a probability threshold)")
        if name in ("beta", "alpha") and v < 0.0:
            raise CnnbalError(f"{flag}: {v:g} is negative")
    return tuple(sorted(set(values)))


def grid_configs(
    r_low: Sequence[float] = DEFAULT_GRID["r_low"],
    r_high: Sequence[float] = DEFAULT_GRID["r_high"],
    beta: Sequence[float] = DEFAULT_GRID["beta"],
    alpha: Sequence[float] = DEFAULT_GRID["alpha"],
) -> tuple[FitParams, ...]:
    """Every combination of the given values (``--mode grid``).

    Values are sorted and de-duplicated. Combinations with ``r_low >= r_high``
    are left out: their competitive set is empty by definition (docs/method.md section 3,
    step 2), so H would be the identity.

    Returns
    -------
    tuple of FitParams
        In ``itertools.product`` order of ``r_low, r_high, beta, alpha``.

    Raises
    ------
    CnnbalError
        A value out of range, or no combination with ``r_low < r_high``.
    """
    given = (r_low, r_high, beta, alpha)
    axes = [_check_values(n, v) for n, v in zip(PARAM_NAMES, given, strict=True)]
    configs = tuple(FitParams(*combo) for combo in itertools.product(*axes) if combo[0] < combo[1])
    if not configs:
        raise CnnbalError("--r-low/--r-high: every combination has r_low >= r_high")
    return configs


def curve_configs(
    center: FitParams = DEFAULT_CENTER,
    r_low: Sequence[float] = DEFAULT_GRID["r_low"],
    r_high: Sequence[float] = DEFAULT_GRID["r_high"],
    beta: Sequence[float] = DEFAULT_GRID["beta"],
    alpha: Sequence[float] = DEFAULT_GRID["alpha"],
) -> tuple[FitParams, ...]:
    """The paper's one-at-a-time curves (Figure 3, ``--mode curves``).

    Four lines through ``center``: each parameter takes its values (plus the
    centre's own value) while the other three stay at the centre.

    Returns
    -------
    tuple of FitParams
        The centre first, then each line in the order of :data:`PARAM_NAMES`
        (values ascending), each configuration once. Points with
        ``r_low >= r_high`` are left out.

    Raises
    ------
    CnnbalError
        A value (or the centre) out of range, or ``center.r_low >= center.r_high``.
    """
    center_values = tuple(float(getattr(center, n)) for n in PARAM_NAMES)
    for name, value in zip(PARAM_NAMES, center_values, strict=True):
        _check_values(name, [value])
    if center_values[0] >= center_values[1]:
        raise CnnbalError("--center: r_low must be below r_high")
    center = FitParams(*center_values)
    configs = [center]
    for i, (name, values) in enumerate(zip(PARAM_NAMES, (r_low, r_high, beta, alpha), strict=True)):
        for value in _check_values(name, [*values, center_values[i]]):
            point = list(center_values)
            point[i] = value
            config = FitParams(*point)
            if config.r_low < config.r_high and config not in configs:
                configs.append(config)
    return tuple(configs)


# ---------------------------------------------------------------- choice


@dataclass(frozen=True)
class Choice:
    """Which configurations are eligible and which one is chosen.

    Attributes
    ----------
    eligible : ndarray of shape (n_configs,), bool
        Mean total accuracy at most ``max_total_drop`` points below raw.
    index : int or None
        The chosen configuration: the eligible one with the highest mean
        objective (ties: higher mean total accuracy, then smaller spread of
        the objective across folds, then the earlier configuration). None when
        no configuration is eligible.
    beats_raw : bool
        The chosen configuration's mean objective is above raw's. When False,
        the raw outputs (H = identity) are the honest recommendation.
    """

    eligible: np.ndarray
    index: int | None
    beats_raw: bool


def choose(
    fold_scores: np.ndarray,
    raw_fold_scores: np.ndarray,
    *,
    objective: str = "worst20",
    max_total_drop: float = DEFAULT_MAX_TOTAL_DROP,
) -> Choice:
    """Pick a configuration from cross-validated scores.

    Parameters
    ----------
    fold_scores : ndarray of shape (n_configs, n_folds, len(SCORE_NAMES))
        Held-out fold scores of each configuration (fractions in [0, 1]).
    raw_fold_scores : ndarray of shape (n_folds, len(SCORE_NAMES))
        The same scores of the raw outputs.
    objective : {"worst20", "low20_val", "balanced", "total"}
        The score to maximise (its mean over folds); see :data:`OBJECTIVES`.
    max_total_drop : float
        Percentage points: a configuration whose mean total accuracy is more
        than this below raw's is not eligible. ``inf`` disables the limit.

    Returns
    -------
    Choice
    """
    column = _objective_column(objective)
    if not max_total_drop >= 0:
        raise CnnbalError(f"--max-total-drop: must be >= 0 points, got {max_total_drop}")
    total = SCORE_NAMES.index("total_accuracy")
    mean = fold_scores.mean(axis=1)
    raw_mean = raw_fold_scores.mean(axis=0)
    eligible = mean[:, total] >= raw_mean[total] - max_total_drop / 100.0 - _TIE
    candidates = np.flatnonzero(eligible)
    if candidates.size == 0:
        return Choice(eligible=eligible, index=None, beats_raw=False)
    order = _ranking(fold_scores, column, candidates)
    best = int(order[0])
    return Choice(
        eligible=eligible,
        index=best,
        beats_raw=bool(mean[best, column] > raw_mean[column] + _TIE),
    )


def _objective_column(objective: str) -> int:
    if objective not in OBJECTIVES:
        raise CnnbalError(
            f"--objective: unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}"
        )
    return SCORE_NAMES.index(OBJECTIVES[objective])


def _ranking(fold_scores: np.ndarray, column: int, indices: np.ndarray) -> np.ndarray:
    """``indices`` best first: mean objective, then mean total, then objective spread."""
    mean = fold_scores.mean(axis=1)
    spread = fold_scores[:, :, column].std(axis=1)
    objective = np.round(mean[indices, column] / _TIE)  # ties within _TIE compare equal
    total = np.round(mean[indices, SCORE_NAMES.index("total_accuracy")] / _TIE)
    # lexsort: last key is primary; stable, so the earlier configuration wins a full tie
    order = np.lexsort((indices, spread[indices], -total, -objective))
    return indices[order]


# ---------------------------------------------------------------- result


@dataclass(frozen=True)
class SweepResult:
    """Cross-validated scores of every configuration, and the choice.

    Attributes
    ----------
    configs : tuple of FitParams
        The configurations, in the order given to :func:`run_sweep`.
    fold_scores : ndarray of shape (n_configs, n_folds, len(SCORE_NAMES))
        Scores on each held-out fold (fractions in [0, 1]).
    raw_fold_scores : ndarray of shape (n_folds, len(SCORE_NAMES))
        The raw outputs' scores on the same folds (``low20_val`` on the same
        class set as the corrected outputs).
    n_competitive : ndarray of shape (n_configs, n_folds), int64
        Competitive training samples of each fit (0: H was the identity).
    fold_sizes : ndarray of shape (n_folds,), int64
        Held-out samples per fold.
    objective : str
        Key of :data:`OBJECTIVES`.
    max_total_drop : float
        Eligibility limit in percentage points.
    choice : Choice
    n_folds, seed, n_samples, n_classes : int
    mode : str
        ``"grid"``, ``"curves"`` or ``"custom"`` (what produced ``configs``).
    center : FitParams or None
        The centre of ``"curves"``.
    warnings : tuple of str
        Edge cases met in the folds (floored accuracies, empty competitive sets...).
    """

    configs: tuple[FitParams, ...]
    fold_scores: np.ndarray
    raw_fold_scores: np.ndarray
    n_competitive: np.ndarray
    fold_sizes: np.ndarray
    objective: str
    max_total_drop: float
    choice: Choice
    n_folds: int
    seed: int
    n_samples: int
    n_classes: int
    mode: str = "custom"
    center: FitParams | None = None
    warnings: tuple[str, ...] = field(default=())

    @property
    def objective_score(self) -> str:
        """The score name the objective maximises (e.g. ``"worst20_accuracy"``)."""
        return OBJECTIVES[self.objective]

    @property
    def chosen(self) -> FitParams | None:
        """The chosen configuration (None when none is eligible)."""
        return None if self.choice.index is None else self.configs[self.choice.index]

    @property
    def eligible(self) -> np.ndarray:
        return self.choice.eligible

    def mean(self, score: str) -> np.ndarray:
        """Mean over folds of ``score`` per configuration, shape (n_configs,)."""
        return self.fold_scores[:, :, SCORE_NAMES.index(score)].mean(axis=1)

    def std(self, score: str) -> np.ndarray:
        """Spread (population std) over folds of ``score`` per configuration."""
        return self.fold_scores[:, :, SCORE_NAMES.index(score)].std(axis=1)

    def gain_std(self, score: str) -> np.ndarray:
        """Spread over folds of the paired gain ``config - raw`` (tighter than :meth:`std`)."""
        column = SCORE_NAMES.index(score)
        return (self.fold_scores[:, :, column] - self.raw_fold_scores[None, :, column]).std(axis=1)

    def raw_mean(self, score: str) -> float:
        return float(self.raw_fold_scores[:, SCORE_NAMES.index(score)].mean())

    def raw_std(self, score: str) -> float:
        return float(self.raw_fold_scores[:, SCORE_NAMES.index(score)].std())

    def ranking(self) -> np.ndarray:
        """Configuration indices, eligible ones first, each group best first."""
        column = _objective_column(self.objective)
        everything = np.arange(len(self.configs))
        eligible = _ranking(self.fold_scores, column, everything[self.eligible])
        others = _ranking(self.fold_scores, column, everything[~self.eligible])
        return np.concatenate([eligible, others]).astype(np.int64)

    def with_choice(
        self, *, objective: str | None = None, max_total_drop: float | None = None
    ) -> SweepResult:
        """The same scores chosen again with another objective or limit (no refitting)."""
        objective = self.objective if objective is None else objective
        max_total_drop = self.max_total_drop if max_total_drop is None else max_total_drop
        choice = choose(
            self.fold_scores,
            self.raw_fold_scores,
            objective=objective,
            max_total_drop=max_total_drop,
        )
        return replace(self, objective=objective, max_total_drop=max_total_drop, choice=choice)

    def anchor(self) -> FitParams:
        """The point the per-parameter curves go through.

        The centre for ``"curves"``; otherwise the chosen configuration, or,
        when none is eligible, the one with the best mean objective.
        """
        if self.mode == "curves" and self.center is not None:
            return self.center
        if self.chosen is not None:
            return self.chosen
        column = _objective_column(self.objective)
        best = _ranking(self.fold_scores, column, np.arange(len(self.configs)))[0]
        return self.configs[int(best)]

    def slices(self, anchor: FitParams | None = None) -> dict[str, np.ndarray]:
        """Per parameter, the configurations that vary it alone around ``anchor``.

        Parameters
        ----------
        anchor : FitParams, optional
            Defaults to :meth:`anchor`.

        Returns
        -------
        dict of str to ndarray of int
            For each name of :data:`PARAM_NAMES`, indices into :attr:`configs`
            whose other three parameters equal the anchor's, sorted by the
            parameter's value (the paper's Figure 3 curves; a slice of a grid).
        """
        anchor = self.anchor() if anchor is None else anchor
        values = np.array([[getattr(c, n) for n in PARAM_NAMES] for c in self.configs])
        point = np.array([getattr(anchor, n) for n in PARAM_NAMES])
        out = {}
        for j, name in enumerate(PARAM_NAMES):
            others = np.delete(np.arange(len(PARAM_NAMES)), j)
            on_line = np.flatnonzero(np.all(values[:, others] == point[others], axis=1))
            out[name] = on_line[np.argsort(values[on_line, j], kind="stable")]
        return out

    def edge_parameters(self) -> dict[str, str]:
        """Parameters whose chosen value is the lowest or highest value swept.

        Returns
        -------
        dict of str to {"lowest", "highest"}
            Only parameters swept over more than one value; the optimum may lie
            beyond the grid in that direction. Empty when nothing is chosen.
        """
        if self.chosen is None:
            return {}
        out = {}
        for name in PARAM_NAMES:
            swept = sorted({getattr(c, name) for c in self.configs})
            value = getattr(self.chosen, name)
            if len(swept) > 1 and value == swept[0]:
                out[name] = "lowest"
            elif len(swept) > 1 and value == swept[-1]:
                out[name] = "highest"
        return out

    def to_dict(self, *, include_configs: bool = True) -> dict:
        """A JSON-ready summary: settings, raw scores, the choice and every configuration."""

        def stats(values: np.ndarray) -> dict:
            return {
                "mean": float(values.mean()),
                "std": float(values.std()),
                "folds": [float(v) for v in values],
            }

        raw = {name: stats(self.raw_fold_scores[:, j]) for j, name in enumerate(SCORE_NAMES)}
        out = {
            "objective": self.objective,
            "objective_score": self.objective_score,
            "max_total_drop_points": float(self.max_total_drop),
            "n_folds": self.n_folds,
            "seed": self.seed,
            "n_samples": self.n_samples,
            "n_classes": self.n_classes,
            "fold_sizes": [int(n) for n in self.fold_sizes],
            "mode": self.mode,
            "center": None if self.center is None else self.center.as_dict(),
            "n_configs": len(self.configs),
            "n_eligible": int(self.eligible.sum()),
            "chosen": None if self.chosen is None else self.chosen.as_dict(),
            "chosen_index": self.choice.index,
            "beats_raw": self.choice.beats_raw,
            "decision": "corrected" if self.choice.beats_raw else "raw",
            "raw": raw,
            "edge_parameters": self.edge_parameters(),
            "warnings": list(self.warnings),
        }
        if self.choice.index is not None:
            out["chosen_scores"] = self._config_dict(self.choice.index, stats)["scores"]
        if include_configs:
            out["configs"] = [self._config_dict(i, stats) for i in self.ranking()]
        return out

    def _config_dict(self, index: int, stats) -> dict:
        return {
            "index": int(index),
            "params": self.configs[index].as_dict(),
            "eligible": bool(self.eligible[index]),
            "scores": {
                name: stats(self.fold_scores[index, :, j]) for j, name in enumerate(SCORE_NAMES)
            },
            "n_competitive": [int(n) for n in self.n_competitive[index]],
        }


# ---------------------------------------------------------------- the sweep


def run_sweep(
    probs: np.ndarray,
    labels: np.ndarray,
    configs: Sequence[FitParams],
    *,
    n_folds: int = 5,
    seed: int = 0,
    objective: str = "worst20",
    max_total_drop: float = DEFAULT_MAX_TOTAL_DROP,
    mode: str = "custom",
    center: FitParams | None = None,
    progress: ProgressCallback | None = None,
) -> SweepResult:
    """Cross-validate the elaborated fit over ``configs`` and choose one.

    For every fold of :func:`stratified_folds` and every configuration: fit H
    on the other folds exactly as :func:`cnnbal.core.fit_elaborated` does,
    correct the held-out fold as :func:`cnnbal.core.apply_correction` does
    (gate ``r_high``), and score it with the metrics of
    :func:`cnnbal.metrics.summarize` (``low20_val`` on the classes with the
    lowest training-fold accuracy, docs/method.md section 5). The results equal that plain
    loop; the shared work (module docstring) makes it several times faster.

    Parameters
    ----------
    probs : ndarray of shape (n_samples, n_classes)
        Validation softmax outputs (validated, see :mod:`cnnbal.io`). Held-out
        folds are corrected in this dtype (float32 stays float32, as in apply).
    labels : ndarray of shape (n_samples,), int
    configs : sequence of FitParams
        E.g. :func:`grid_configs` or :func:`curve_configs`.
    n_folds : int
        Number of folds, at least 2.
    seed : int
        Seed of the fold assignment.
    objective : {"worst20", "low20_val", "balanced", "total"}
    max_total_drop : float
        Eligibility limit in percentage points (see :func:`choose`).
    mode : str
        Recorded in the result (``"grid"``, ``"curves"``, ``"custom"``).
    center : FitParams, optional
        Recorded in the result (the centre of the curves).
    progress : callable, optional
        Called as ``progress(done, total)`` after each (configuration, fold) fit.

    Returns
    -------
    SweepResult
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise CnnbalError(
            f"expected probs (n_samples, n_classes) and labels (n_samples,), got shapes "
            f"{probs.shape} and {labels.shape}"
        )
    configs = tuple(FitParams(*(float(getattr(c, n)) for n in PARAM_NAMES)) for c in configs)
    if not configs:
        raise CnnbalError("no configurations to sweep")
    _objective_column(objective)
    n_samples, n_classes = probs.shape
    folds = stratified_folds(labels, n_folds, seed)
    notes = _fold_notes(labels, n_classes, n_folds)

    p64 = _as_float64_rows(probs)
    fold_scores = np.empty((len(configs), n_folds, len(SCORE_NAMES)))
    raw_fold_scores = np.empty((n_folds, len(SCORE_NAMES)))
    n_competitive = np.zeros((len(configs), n_folds), dtype=np.int64)
    groups = _group_configs(configs)
    total_steps = len(configs) * n_folds
    done = 0
    empty_fits = 0
    floored_folds: list[int] = []

    with _small_blas_threads(n_classes), _overflow_as_error():
        for step in _fold_fits(probs, p64, labels, folds, groups, n_classes):
            k, fold = step.fold_index, step.fold
            if step.config_index is None:  # a new fold begins: its raw scores
                raw_fold_scores[k] = fold.scores(fold.raw_pred)
                if fold.floored:
                    floored_folds.append(k)
                continue
            fold_scores[step.config_index, k] = fold.scores(step.pred)
            n_competitive[step.config_index, k] = step.n_competitive
            empty_fits += step.n_competitive == 0
            done += 1
            if progress is not None:
                progress(done, total_steps)

    near_one = sorted({c.alpha for c in configs if abs(c.alpha - 1.0) < _ALPHA_NEAR_ONE})
    if near_one:
        notes.append(
            f"alpha {', '.join(f'{a:g}' for a in near_one)} is near 1, where the padding rows "
            "[alpha e_k, 1] are orthogonal to [1 .. 1 -1] like the sample rows: H is (nearly) "
            "undetermined along that direction and amplifies float32 row-sum rounding"
        )
    if floored_folds:
        notes.append(
            "zero training accuracy in some class(es) of fold(s) "
            f"{', '.join(str(k) for k in floored_folds)}: floored at 0.5/n_k for the weights"
        )
    if empty_fits:
        notes.append(f"{empty_fits} fit(s) had an empty competitive set (H = identity there)")
    choice = choose(
        fold_scores, raw_fold_scores, objective=objective, max_total_drop=max_total_drop
    )
    return SweepResult(
        configs=configs,
        fold_scores=fold_scores,
        raw_fold_scores=raw_fold_scores,
        n_competitive=n_competitive,
        fold_sizes=np.array([len(test) for _, test in folds], dtype=np.int64),
        objective=objective,
        max_total_drop=float(max_total_drop),
        choice=choice,
        n_folds=int(n_folds),
        seed=int(seed),
        n_samples=int(n_samples),
        n_classes=int(n_classes),
        mode=mode,
        center=center,
        warnings=tuple(notes),
    )


@dataclass(frozen=True)
class _FitStep:
    """One step of :func:`_fold_fits`: a fold's start, or one configuration's fit on it."""

    fold_index: int
    fold: _Fold
    config_index: int | None = None
    H: np.ndarray | None = None
    n_competitive: int = 0
    pred: np.ndarray | None = None  # held-out predictions of the corrected outputs


def _fold_fits(probs, p64, labels, folds, groups, n_classes) -> Iterator[_FitStep]:
    """Every (fold, configuration) fit and its held-out predictions, sharing the work.

    Yields, per fold, a step with ``config_index=None`` and then one step per
    configuration, in the order of ``groups`` (see :func:`_group_configs`).
    The H of a step equals ``fit_elaborated(probs[train], labels[train], config).H``
    and ``pred`` equals the argmax of ``apply_correction(H, probs[test], r_high)``.
    """
    for k, (train, test) in enumerate(folds):
        fold = _Fold.build(probs, p64, labels, train, test, n_classes)
        yield _FitStep(fold_index=k, fold=fold)
        gated_by_r_high: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        for (r_low, r_high), by_beta in groups.items():
            if r_high not in gated_by_r_high:
                gated = fold.test_max < r_high  # apply_correction's gate, in the input dtype
                gated_by_r_high[r_high] = (gated, fold.test_probs[gated])
            gated, gated_probs = gated_by_r_high[r_high]
            system = _SampleSystem.build(fold, r_low, r_high, n_classes)
            for beta, by_alpha in by_beta.items():
                if system.n_competitive:
                    base_gram, base_rhs = system.weighted(fold.safe_accuracy, beta)
                for alpha, index in by_alpha:
                    if system.n_competitive:
                        H = _solve(*_add_padding(base_gram, base_rhs, alpha))
                    else:
                        H = identity_h(n_classes)  # as fit_elaborated: empty set, identity
                    pred = fold.raw_pred.copy()
                    if gated_probs.shape[0]:
                        # rows above the gate are left as they are (docs/method.md section 4)
                        pred[gated] = apply_correction(H, gated_probs).argmax(axis=1)
                    yield _FitStep(
                        fold_index=k,
                        fold=fold,
                        config_index=index,
                        H=H,
                        n_competitive=system.n_competitive,
                        pred=pred,
                    )


@dataclass(frozen=True)
class _Fold:
    """What one fold shares across configurations (computed once per fold)."""

    train_probs: np.ndarray  # float64, renormalised (what fit_elaborated fits on)
    train_labels: np.ndarray
    train_true_prob: np.ndarray
    train_max: np.ndarray
    safe_accuracy: np.ndarray  # floored per-class training accuracy
    floored: tuple[int, ...]
    test_probs: np.ndarray  # input dtype (what apply_correction corrects)
    test_labels: np.ndarray
    test_max: np.ndarray
    raw_pred: np.ndarray
    n_low: int
    low20_val_member: np.ndarray  # held-out samples of the low20_val classes
    test_counts: np.ndarray  # held-out samples per class
    test_present: np.ndarray  # classes with held-out samples

    @classmethod
    def build(cls, probs, p64, labels, train, test, n_classes) -> _Fold:
        # training rows ordered by class, so that every competitive subset is
        # too and its per-class sums are one reduceat (sums are order-free)
        train = train[np.argsort(labels[train], kind="stable")]
        train_probs = p64[train]
        train_labels = labels[train]
        accuracy, counts = class_accuracy(train_probs, train_labels, n_classes)
        safe_accuracy, floored, _ = _floored_accuracy(accuracy, counts)
        test_probs = probs[test]
        test_labels = labels[test]
        test_counts = np.bincount(test_labels, minlength=n_classes)
        n_low = low_fraction_count(n_classes)
        # as cnnbal.metrics.compare with val_class_accuracy = the training folds' accuracy
        low20_val = lowest_classes(np.where(test_counts > 0, accuracy, np.nan), n_low)
        return cls(
            train_probs=train_probs,
            train_labels=train_labels,
            train_true_prob=train_probs[np.arange(len(train)), train_labels],
            train_max=train_probs.max(axis=1),
            safe_accuracy=safe_accuracy,
            floored=floored,
            test_probs=test_probs,
            test_labels=test_labels,
            test_max=test_probs.max(axis=1),
            raw_pred=test_probs.argmax(axis=1),
            n_low=n_low,
            low20_val_member=np.isin(test_labels, low20_val),
            test_counts=test_counts,
            test_present=test_counts > 0,
        )

    def scores(self, pred: np.ndarray) -> np.ndarray:
        """:data:`SCORE_NAMES` of held-out predictions, as :func:`cnnbal.metrics.summarize`.

        The same divisions in the same order as :func:`cnnbal.metrics.class_recall`
        and ``summarize``, with the per-fold class counts computed once.
        """
        labels = self.test_labels
        right = pred == labels
        correct = np.bincount(labels[right], minlength=len(self.test_counts))
        recall = correct[self.test_present] / self.test_counts[self.test_present]
        member = self.low20_val_member
        n_member = np.count_nonzero(member)
        return np.array(
            [
                np.count_nonzero(right) / len(labels),
                np.sort(recall)[: self.n_low].mean(),
                recall.mean(),
                np.count_nonzero(right[member]) / n_member if n_member else np.nan,
            ]
        )


def _group_configs(
    configs: tuple[FitParams, ...],
) -> dict[tuple[float, float], dict[float, list[tuple[float, int]]]]:
    """``{(r_low, r_high): {beta: [(alpha, config index), ...]}}`` (insertion ordered)."""
    groups: dict[tuple[float, float], dict[float, list[tuple[float, int]]]] = {}
    for index, c in enumerate(configs):
        groups.setdefault((c.r_low, c.r_high), {}).setdefault(c.beta, []).append((c.alpha, index))
    return groups


@dataclass(frozen=True)
class _SampleSystem:
    """The competitive set of one fold and ``(r_low, r_high)``, and its beta-free sums."""

    probs: np.ndarray  # competitive training rows, float64
    labels: np.ndarray
    class_sums: np.ndarray  # (n_classes, n_classes): sum of p_n per class
    class_n: np.ndarray  # (n_classes,): competitive samples per class

    @property
    def n_competitive(self) -> int:
        return len(self.labels)

    @classmethod
    def build(cls, fold: _Fold, r_low: float, r_high: float, n_classes: int) -> _SampleSystem:
        # competitive_mask of docs/method.md section 3 step 2, on the precomputed columns
        mask = (fold.train_true_prob > r_low) & (fold.train_max < r_high)
        probs, labels = fold.train_probs[mask], fold.train_labels[mask]
        return cls(
            probs=probs,
            labels=labels,
            class_sums=_sum_sorted_by_class(probs, labels, n_classes),
            class_n=np.bincount(labels, minlength=n_classes),
        )

    def weighted(self, safe_accuracy: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
        """``_elaborated_system(..., alpha=0)`` for this beta, with the class sums reused.

        The same floating-point operations in the same order as
        :func:`cnnbal.core._elaborated_system` (so bit-for-bit its result); only
        the beta-free per-class sums are computed once instead of per beta.
        """
        p, n_classes = self.probs, len(safe_accuracy)
        class_weight_sq = safe_accuracy ** (-2.0 * beta)
        w_sq = class_weight_sq[self.labels]  # s_n^2
        scaled = p * np.sqrt(w_sq)[:, None]
        gram = np.empty((n_classes + 1, n_classes + 1))
        gram[:n_classes, :n_classes] = scaled.T @ scaled
        col = p.T @ w_sq
        gram[:n_classes, n_classes] = col
        gram[n_classes, :n_classes] = col
        gram[n_classes, n_classes] = w_sq.sum()
        rhs = np.empty((n_classes, n_classes + 1))
        rhs[:, :n_classes] = self.class_sums * class_weight_sq[:, None]
        rhs[:, n_classes] = self.class_n * class_weight_sq
        # the padding's alpha-free part (alpha = 0 in _elaborated_system)
        gram[n_classes, n_classes] += n_classes
        return gram, rhs


def _sum_sorted_by_class(rows: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Sum of ``rows`` per label for labels already sorted, shape (n_classes, rows.shape[1])."""
    out = np.zeros((n_classes, rows.shape[1]))
    if len(labels):
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        out[labels[starts]] = np.add.reduceat(rows, starts, axis=0)
    return out


def _add_padding(
    base_gram: np.ndarray, base_rhs: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Identity padding rows (docs/method.md section 3, step 4) as ``_elaborated_system`` adds.

    ``base_*`` were built with ``alpha = 0`` (which already holds the K in the
    corner); the additions below are the same floating-point operations in the
    same order, so the result is bit-for-bit the system of ``fit_elaborated``.
    """
    n_classes = base_rhs.shape[0]
    gram = base_gram.copy()
    rhs = base_rhs.copy()
    diag = np.arange(n_classes)
    gram[diag, diag] += alpha * alpha
    gram[:n_classes, n_classes] += alpha
    gram[n_classes, :n_classes] += alpha
    rhs[diag, diag] += alpha * alpha
    rhs[:, n_classes] += alpha
    return gram, rhs


def _solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """:func:`cnnbal.core.solve_normal_equations`, faster on the usual well-conditioned gram.

    One LAPACK Cholesky factorisation and two triangular solves (``potrf`` +
    ``potrs``) when the gram is clearly well conditioned; anything else (not
    positive definite, near-singular or near the core's threshold) goes to the
    core's solver, which then decides exactly as in ``fit_elaborated``. Agrees
    with it to rounding (~1e-16; the core's result itself varies that much with
    the number of BLAS threads).
    """
    from scipy.linalg import lapack

    factor, info = lapack.dpotrf(gram, lower=1, clean=0)
    if info == 0:
        diag = np.abs(np.diag(factor))
        # the core's test is diag.min() > PIVOT_RATIO_MIN * diag.max(); near that line
        # (e.g. alpha = 1, where the padding rows leave [1 .. 1 -1] unconstrained)
        # the two factorisations could decide differently, so leave it to the core
        if diag.min() > _CORE_MARGIN * PIVOT_RATIO_MIN * diag.max():
            solution, info = lapack.dpotrs(factor, rhs.T, lower=1)
            if info == 0:
                return solution.T
    return solve_normal_equations(gram, rhs)


@contextlib.contextmanager
def _overflow_as_error() -> Iterator[None]:
    """A configuration whose normal equations overflow is a user error (its flags)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # reported once, below
            yield
    except OverflowError as exc:
        raise CnnbalError(f"--beta/--alpha: {exc}") from None


@contextlib.contextmanager
def _small_blas_threads(n_classes: int) -> Iterator[None]:
    """One BLAS thread for small systems, if threadpoolctl is installed.

    The products and solves of a sweep are small; with several BLAS threads
    (and numpy's and scipy's separate OpenBLAS copies) they spend more time
    synchronising than computing, and on a busy machine a step can stall for
    100 ms (docs/method.md section 7.1). Large K keeps the default threads.
    """
    if n_classes > _SINGLE_THREAD_MAX_CLASSES:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        yield
        return
    import scipy.linalg  # noqa: F401  (load scipy's OpenBLAS first: only loaded ones are limited)

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _fold_notes(labels: np.ndarray, n_classes: int, n_folds: int) -> list[str]:
    counts = np.bincount(labels, minlength=n_classes)
    notes = []
    absent = np.flatnonzero(counts == 0)
    if absent.size:
        notes.append(f"{absent.size} class(es) have no validation samples")
    few = np.flatnonzero((counts > 0) & (counts < n_folds))
    if few.size:
        notes.append(
            f"{few.size} class(es) have fewer samples than the {n_folds} folds "
            "(some held-out folds lack them)"
        )
    return notes
