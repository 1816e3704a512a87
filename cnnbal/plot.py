"""Figures of the report room: the sweep's Figure-3 curves (matplotlib only here).

matplotlib is the optional ``plot`` extra; it is imported lazily, with the
non-interactive Agg backend, so that nothing else in cnnbal pays for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnbal.errors import CnnbalError

if TYPE_CHECKING:  # pragma: no cover
    from cnnbal.compare import MethodComparison
    from cnnbal.sweep import SweepResult

__all__ = ["plot_compare", "plot_sweep", "require_matplotlib"]

_LABELS = {
    "r_low": "R_low (true-class probability floor)",
    "r_high": "R_high (confidence ceiling, apply gate)",
    "beta": "beta (weight exponent)",
    "alpha": "alpha (pull toward identity)",
}
_SHORT = {
    "worst20_accuracy": "worst-20%",
    "low20_val_accuracy": "low-20% (val classes)",
    "balanced_accuracy": "balanced",
    "total_accuracy": "total",
}


def require_matplotlib():
    """Import matplotlib's pyplot on the Agg backend, or explain how to install it.

    Raises
    ------
    CnnbalError
        matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        from cnnbal._install import install_hint

        raise CnnbalError(
            f"--plot needs matplotlib, which is not installed: {install_hint('plot')}"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(result: SweepResult, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write the sweep as one panel per parameter, like the paper's Figure 3.

    Each panel varies one parameter with the other three at the anchor
    (:meth:`SweepResult.anchor`: the centre of ``curves``, else the chosen
    configuration): the objective's and the total accuracy's cross-validated
    change against raw, in percentage points, with the paired fold spread as a
    band. Raw is the zero line; the eligibility limit on total accuracy is a
    dashed line; ineligible points are hollow; the anchor's value is marked.

    Parameters
    ----------
    result : SweepResult
    path : str or PathLike
        The PNG to write (atomically; any suffix, the format is PNG).
    title : str, optional
        First line of the figure title (e.g. the validation file's name).

    Returns
    -------
    Path
    """
    from cnnbal.io import atomic_output
    from cnnbal.sweep import PARAM_NAMES

    plt = require_matplotlib()
    path = Path(path)
    objective = result.objective_score
    anchor = result.anchor()
    slices = result.slices(anchor)
    chosen = result.chosen

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    series = [(objective, "tab:blue", "o")]
    if objective != "total_accuracy":
        series.append(("total_accuracy", "tab:orange", "s"))
    for ax, name in zip(axes.ravel(), PARAM_NAMES, strict=True):
        indices = slices[name]
        x = np.array([getattr(result.configs[i], name) for i in indices])
        ax.axhline(0.0, color="black", lw=1.2, label="raw (no correction)")
        ax.axhline(
            -result.max_total_drop,
            color="tab:red",
            lw=1,
            ls="--",
            label=f"total-accuracy limit (-{result.max_total_drop:g} pts)",
        )
        for score, color, marker in series:
            gain = 100 * (result.mean(score)[indices] - result.raw_mean(score))
            spread = 100 * result.gain_std(score)[indices]
            label = f"{_SHORT[score]} accuracy" + (" (objective)" if score == objective else "")
            ax.fill_between(x, gain - spread, gain + spread, color=color, alpha=0.18, lw=0)
            ax.plot(x, gain, color=color, lw=1.8, label=label)
            eligible = result.eligible[indices]
            ax.scatter(x[eligible], gain[eligible], color=color, marker=marker, zorder=3)
            ax.scatter(
                x[~eligible],
                gain[~eligible],
                facecolors="white",
                edgecolors=color,
                marker=marker,
                zorder=3,
            )
        _mark_anchor(ax, result, name, anchor, chosen)
        _mark_best(ax, result, name, indices, x)
        others = ", ".join(
            f"{other}={_fmt(getattr(anchor, other))}" for other in PARAM_NAMES if other != name
        )
        ax.set_title(f"{name}   ({others})", fontsize=10)
        ax.set_xlabel(_LABELS[name])
        ax.set_ylabel("change vs raw (percentage points)")
        ax.set_xticks(x)
        ax.set_xticklabels([_fmt(v) for v in x])
        ax.grid(alpha=0.3)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    hollow = plt.Line2D([], [], ls="", marker="o", markerfacecolor="white", markeredgecolor="gray")
    handles.append(hollow)
    labels.append("hollow: not eligible (total drop over the limit)")
    fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=8.5, frameon=False)
    fig.suptitle(_suptitle(result, title), fontsize=11)
    with atomic_output(path, suffixes=(".png",)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _mark_anchor(ax, result: SweepResult, name: str, anchor, chosen) -> None:
    value = getattr(anchor, name)
    is_chosen = chosen is not None and all(
        getattr(chosen, other) == getattr(anchor, other)
        for other in ("r_low", "r_high", "beta", "alpha")
    )
    label = "chosen" if is_chosen else ("centre" if result.mode == "curves" else "anchor")
    ax.axvline(value, color="tab:green", lw=1.2, alpha=0.7)
    low, high = ax.get_xlim()
    right_half = value > (low + high) / 2  # write the label on the side with room
    ax.annotate(
        f"{label} {_fmt(value)}",
        xy=(value, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(-3 if right_half else 3, -12),
        textcoords="offset points",
        ha="right" if right_half else "left",
        color="tab:green",
        fontsize=8,
    )
    if chosen is not None and not is_chosen:
        # the chosen point is elsewhere (curves mode): say where, if on this line
        if all(
            getattr(chosen, o) == getattr(anchor, o)
            for o in ("r_low", "r_high", "beta", "alpha")
            if o != name
        ):
            value = getattr(chosen, name)
            ax.axvline(value, color="tab:purple", lw=1.2, ls=":")
            ax.annotate(
                f"chosen {_fmt(value)}",
                xy=(value, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(-3, -24),
                textcoords="offset points",
                ha="right",
                color="tab:purple",
                fontsize=8,
            )


def _mark_best(ax, result: SweepResult, name: str, indices: np.ndarray, x: np.ndarray) -> None:
    """Say in words which way this parameter wants to move (edge of the swept range?)."""
    if len(indices) < 2:
        ax.text(0.02, 0.04, "one value swept", transform=ax.transAxes, fontsize=8)
        return
    score = result.objective_score
    objective = result.mean(score)[indices]
    eligible = result.eligible[indices]
    pool = np.flatnonzero(eligible) if eligible.any() else np.arange(len(indices))
    best = pool[np.argmax(objective[pool])]
    # differences smaller than the typical fold spread of the gain are noise
    noise = float(np.mean(result.gain_std(score)[indices]))
    if np.ptp(objective) < 0.05 / 100:
        text = "flat: this parameter hardly matters here"
    elif np.ptp(objective) < noise:
        text = f"best at {_fmt(x[best])}, but within\nfold noise (±{100 * noise:.2f} pts)"
    elif best == 0:
        text = f"best at the lowest value {_fmt(x[0])}:\ntry lower"
    elif best == len(x) - 1:
        text = f"best at the highest value {_fmt(x[-1])}:\ntry higher"
    else:
        text = f"best inside the range, at {_fmt(x[best])}"
    ax.text(
        0.02,
        0.04,
        text,
        transform=ax.transAxes,
        fontsize=8.5,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "lw": 0.5},
    )


def _suptitle(result: SweepResult, title: str | None) -> str:
    objective = result.objective_score
    raw = (
        f"raw: {_SHORT[objective]} {100 * result.raw_mean(objective):.2f}%, "
        f"total {100 * result.raw_mean('total_accuracy'):.2f}%"
    )
    chosen = result.chosen
    if chosen is None:
        verdict = "no configuration eligible: keep raw"
    else:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in chosen.as_dict().items())
        verdict = f"chosen {params}" + ("" if result.choice.beats_raw else " (does not beat raw)")
    head = f"{title}: " if title else ""
    return (
        f"{head}{result.n_folds}-fold CV sweep on validation (n={result.n_samples}, "
        f"K={result.n_classes}), objective {_SHORT[objective]}; band = fold spread of the "
        f"gain\n{raw}; {verdict}"
    )


def _fmt(value: float) -> str:
    return f"{value:g}"


def plot_compare(
    result: MethodComparison, path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Write ``cnnbal compare`` as one panel per metric, one row per method.

    Each row shows the method's change against raw in percentage points: the
    cross-validated estimate on VAL (hollow diamond: the mean over the held-out
    folds; bar: the spread of the change over folds) and, when TEST was given,
    the change on TEST (dot, bar: the 95% paired bootstrap interval). The
    recommended method's label is bold; ineligible methods (CV total below the
    limit) are greyed.

    Parameters
    ----------
    result : MethodComparison
    path : str or PathLike
        The PNG to write (atomically).
    title : str, optional
        First line of the figure title (e.g. the validation file's name).

    Returns
    -------
    Path
    """
    from cnnbal.compare import TEST_METRICS
    from cnnbal.io import atomic_output

    plt = require_matplotlib()
    path = Path(path)
    has_test = result.n_test is not None
    metrics = (
        list(TEST_METRICS)
        if has_test
        else ["total_accuracy", "worst20_accuracy", "balanced_accuracy"]
    )
    names = {
        "total_accuracy": "total",
        "worst20_accuracy": "worst-20%",
        "low20_val_accuracy": "low-20% (val classes)",
        "balanced_accuracy": "balanced",
        "worst_class_accuracy": "worst class",
    }
    n = len(result.results)
    fig, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(2.6 * len(metrics) + 1.8, 0.45 * n + 1.9),
        sharey=True,
        constrained_layout=True,
    )
    axes = np.atleast_1d(axes)
    y = np.arange(n)[::-1].astype(float)
    for ax, metric in zip(axes, metrics, strict=True):
        ax.axvline(0.0, color="black", lw=1)
        if metric == "total_accuracy":
            ax.axvline(-result.max_total_drop, color="tab:red", lw=1, ls="--")
        for row, item in zip(y, result.results, strict=True):
            color = "tab:blue" if item.eligible else "0.6"
            if metric in item.cv.score_names:
                column = item.cv.score_names.index(metric)
                diffs = 100 * (item.cv.fold_scores[:, column] - item.cv.raw_fold_scores[:, column])
                ax.errorbar(
                    diffs.mean(),
                    row + 0.18,
                    xerr=diffs.std(),
                    fmt="D",
                    mfc="white",
                    color=color,
                    ms=5,
                    capsize=2,
                    lw=1,
                )
            if item.test is not None:
                low, high = item.test.intervals.get(metric, (np.nan, np.nan))
                change = 100 * item.test.change(metric)
                xerr = [[max(change - 100 * low, 0)], [max(100 * high - change, 0)]]
                ax.errorbar(
                    change,
                    row - 0.18,
                    xerr=xerr,
                    fmt="o",
                    color=color,
                    ms=5,
                    capsize=3,
                    lw=1.5,
                )
        ax.set_title(names[metric], fontsize=10)
        ax.set_xlabel("change vs raw (points)", fontsize=8.5)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(
        [f"{i.method} *" if i.method == result.recommended else i.method for i in result.results],
        fontsize=9,
    )
    for label, item in zip(axes[0].get_yticklabels(), result.results, strict=True):
        if item.method == result.recommended:
            label.set_fontweight("bold")
        if not item.eligible:
            label.set_color("0.5")
    lines = [title or "cnnbal compare"]
    legend = f"hollow diamond: {result.n_folds}-fold CV on VAL (bar: fold spread)"
    if has_test:
        legend += "; dot: TEST (bar: 95% paired bootstrap interval)"
    recommended = result.recommended or "none (keep raw)"
    lines.append(f"{legend}. Recommended on VAL ({result.objective}): {recommended}")
    fig.suptitle("\n".join(lines), fontsize=10)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
