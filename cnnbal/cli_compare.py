"""``cnnbal compare``: every correction method side by side; one recommended on VAL only.

A thin layer over :func:`cnnbal.compare.compare_methods` (the computation),
:mod:`cnnbal.plot` (the figure) and :mod:`cnnbal.artifact` (``-o``). Registered
by :mod:`cnnbal.cli` as ``app.command("compare")(compare_command)``.

Exit codes: 0 done; 1 ``-o`` was asked for but no method is recommended (none
beats the raw outputs within ``--max-total-drop``), so nothing was written;
2 a user error.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cnnbal._cli_common import (
    ClassesOpt,
    DelimiterOpt,
    JsonOpt,
    LabelColumnOpt,
    LabelsOpt,
    LogitsOpt,
    PrefixOpt,
    QuietOpt,
    RenormalizeOpt,
    ScoreColumnOpt,
    handle_errors,
    print_json,
    read_options,
    report_renormalized,
    show_progress,
    stderr_console,
)
from cnnbal.cli_sweep import Objective
from cnnbal.errors import CnnbalError

__all__ = ["compare_command"]

#: Tables are laid out for this many columns (also in a pipe, where rich would use 80).
TABLE_WIDTH = 100

_TEST_HEADERS = {
    "total_accuracy": "test\ntotal",
    "worst20_accuracy": "test\nworst-20",
    "low20_val_accuracy": "test\nlow-20v",
    "balanced_accuracy": "test\nbalanced",
    "worst_class_accuracy": "test\nworst cl",
}
_CV_HEADERS = {
    "total_accuracy": "cv\ntotal",
    "worst20_accuracy": "cv\nw-20",
    "balanced_accuracy": "cv\nbal",
}


@handle_errors
def compare_command(
    val: Annotated[
        Path,
        typer.Argument(
            help="Validation outputs with labels: every fit, every choice and the "
            "recommendation see only these.",
            show_default=False,
            metavar="VAL",
        ),
    ],
    test: Annotated[
        Path | None,
        typer.Option(
            "--test",
            help="Also score every fitted method on these outputs (with bootstrap "
            "intervals). Never used for any choice.",
            metavar="FILE",
        ),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma-separated methods to compare (default: all of them).",
            metavar="LIST",
        ),
    ] = None,
    objective: Annotated[
        Objective,
        typer.Option(
            "--objective",
            help="What the recommendation maximises (cross-validated on VAL).",
            metavar="worst20|low20_val|balanced|total",
        ),
    ] = Objective.worst20,
    max_total_drop: Annotated[
        float,
        typer.Option(
            "--max-total-drop",
            help="Recommend only methods whose CV total accuracy is at most this many points "
            "below raw.",
            metavar="PTS",
        ),
    ] = 0.5,
    folds: Annotated[
        int, typer.Option("--folds", help="Stratified CV folds (>= 2).", metavar="N")
    ] = 5,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of folds and bootstrap.", metavar="N")
    ] = 0,
    n_boot: Annotated[
        int,
        typer.Option("--bootstrap", help="Bootstrap resamples of TEST.", min=100, metavar="N"),
    ] = 1000,
    prior: Annotated[
        str,
        typer.Option(
            "--prior",
            help="prior-match's target: uniform, val, or a FILE of K weights.",
            metavar="uniform|val|FILE",
        ),
    ] = "uniform",
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Write the recommended correction here (.npz).", metavar="FILE"
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Draw the changes and their intervals, one row per method (PNG; needs the "
            "plot extra).",
            metavar="FILE",
        ),
    ] = None,
    test_labels: Annotated[
        Path | None,
        typer.Option(
            "--test-labels",
            help="Labels for a .npy --test file (1-D integer .npy).",
            metavar="FILE",
        ),
    ] = None,
    logits: LogitsOpt = False,
    renormalize: RenormalizeOpt = False,
    labels: LabelsOpt = None,
    label_column: LabelColumnOpt = None,
    score_column: ScoreColumnOpt = None,
    prob_prefix: PrefixOpt = None,
    delimiter: DelimiterOpt = None,
    classes: ClassesOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit every correction method on VAL and put them side by side; recommend one.

    Each method is fitted on VAL (hyper-parameters by CV) and its effect on new
    data estimated by nested k-fold CV on VAL. The recommendation is the best
    CV --objective among methods whose CV total accuracy stays within
    --max-total-drop points of raw, decided before TEST is read.
    """
    from cnnbal.compare import compare_methods, parse_methods

    started = time.perf_counter()
    names = parse_methods(methods)
    if folds < 2:
        raise CnnbalError(f"--folds: need at least 2 folds, got {folds}")
    if seed < 0:
        raise CnnbalError(f"--seed: must be >= 0, got {seed}")
    if not max_total_drop >= 0:
        raise CnnbalError(f"--max-total-drop: must be >= 0 points, got {max_total_drop}")
    if plot is not None:
        from cnnbal.plot import require_matplotlib

        require_matplotlib()  # fail before the long part, not after it
    from cnnbal.io import check_outputs

    prior_file = None if prior in ("uniform", "val") else Path(prior)
    check_outputs(
        {"-o": output, "--plot": plot},
        {
            "VAL": val,
            "--test": test,
            "--labels": labels,
            "--test-labels": test_labels,
            "--classes": classes,
            "--prior": prior_file,
        },
        suffixes={"-o": (".npz",), "--plot": (".png",)},
    )

    from cnnbal.io import file_sha256, read_outputs

    reading = {
        "renormalize": renormalize,
        "label_column": label_column,
        "score_column": score_column,
        "delimiter": delimiter,
    }
    val_out = read_outputs(val, read_options(logits, labels, prob_prefix, classes, **reading))
    report_renormalized(val_out.n_renormalized, val.name, quiet)
    if val_out.labels is None:
        raise CnnbalError(f"{val.name}: compare needs labels on VAL")
    test_out = None
    if test is not None:
        test_out = read_outputs(
            test, read_options(logits, test_labels, prob_prefix, classes, **reading)
        )
        report_renormalized(test_out.n_renormalized, test.name, quiet)
        if test_out.labels is None:
            raise CnnbalError(f"{test.name}: --test needs labels")
        if test_out.n_classes != val_out.n_classes:
            raise CnnbalError(
                f"{test.name}: {test_out.n_classes} classes, but {val.name} has {val_out.n_classes}"
            )
    target = prior
    if prior_file is not None:
        from cnnbal.pipeline import read_prior

        target = read_prior(prior_file, val_out.n_classes)

    kwargs = {
        "methods": names,
        "test_probs": None if test_out is None else test_out.probs,
        "test_labels": None if test_out is None else test_out.labels,
        "objective": objective.value,
        "max_total_drop": max_total_drop,
        "n_folds": folds,
        "seed": seed,
        "n_boot": n_boot,
        "prior": target,
    }
    if show_progress() and not json_out and not quiet:
        with stderr_console().status("compare") as status:

            def progress(method: str, index: int, total: int) -> None:
                status.update(f"compare: fitting {method} ({index + 1}/{total}), CV inside")

            result = compare_methods(val_out.probs, val_out.labels, progress=progress, **kwargs)
    else:
        result = compare_methods(val_out.probs, val_out.labels, **kwargs)

    written = None
    if output is not None and result.recommended is not None:
        from cnnbal.artifact import Artifact, save_artifact

        chosen = result.result(result.recommended)
        artifact = Artifact.from_method_fit(
            chosen.fit,
            class_names=val_out.class_names,
            input_sha256=file_sha256(val),
            input_name=val.name,
            provenance={"compare": _provenance(result)},
        )
        written = save_artifact(output, artifact)
    plotted = None
    if plot is not None:
        from cnnbal.plot import plot_compare

        plotted = plot_compare(result, plot, title=val.name)

    seconds = time.perf_counter() - started
    if json_out:
        payload = result.to_dict()
        payload.update(
            {
                "val": {"path": str(val), "n_samples": val_out.n_samples},
                "test": None if test_out is None else {"path": str(test)},
                "output": None if written is None else str(written),
                "plot": None if plotted is None else str(plotted),
                "seconds": seconds,
            }
        )
        print_json(payload)
        console = stderr_console(quiet)
        for item in result.results:
            for note in item.fit.warnings:
                console.print(f"[yellow]note ({item.method}):[/] {note}", highlight=False)
    else:
        console = _console(quiet)
        _print_human(console, result, val, test, seconds)
        notes = stderr_console(quiet)
        for item in result.results:
            for note in item.fit.warnings:
                notes.print(f"[yellow]note ({item.method}):[/] {note}", highlight=False)
        # soft_wrap: the table is laid out for TABLE_WIDTH, but a path is never cut
        if written is not None:
            console.print(
                f"wrote {written}: {result.recommended}, refit on all of VAL",
                highlight=False,
                soft_wrap=True,
            )
        if plotted is not None:
            console.print(f"wrote {plotted}", highlight=False, soft_wrap=True)
    if output is not None and written is None:
        stderr_console().print(
            f"[bold red]Nothing written to {output}[/]: no method beats the raw outputs on "
            f"{result.objective} within --max-total-drop {result.max_total_drop:g}.",
            highlight=False,
        )
        raise typer.Exit(1)


def _console(quiet: bool = False):
    """stdout, laid out for TABLE_WIDTH columns also in a pipe (rich would use 80)."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console(highlight=False, quiet=quiet)
    return Console(width=TABLE_WIDTH, highlight=False, quiet=quiet)


def _provenance(result) -> dict:
    """What the written artifact records about the comparison that recommended it."""
    return {
        "recommended": result.recommended,
        "objective": result.objective,
        "max_total_drop": result.max_total_drop,
        "n_folds": result.n_folds,
        "seed": result.seed,
        "cv_change": {item.method: item.cv.mean_change for item in result.results},
        "eligible": {item.method: item.eligible for item in result.results},
    }


# ---------------------------------------------------------------- the table


def _pts(value: float) -> str:
    return "-" if value != value else f"{100 * value:+.2f}"


def _pct(value: float) -> str:
    return "-" if value != value else f"{100 * value:.2f}"


def _interval(low: float, high: float) -> str:
    if low != low or high != high:
        return ""
    return f"{100 * low:.1f},{100 * high:.1f}"


_SHORT_HYPER = {"temperature": "T"}


def _hyper(item) -> str:
    """``eta=0.3`` (the method's hyper-parameters), or its kind when it has none."""
    if not item.fit.hyper or item.method in ("elaborated", "naive"):
        return item.fit.correction.kind
    return ", ".join(f"{_SHORT_HYPER.get(k, k)}={v:.3g}" for k, v in item.fit.hyper.items())


def build_table(result, val: Path, test: Path | None):
    """The one table: per method the CV estimate on VAL and, with TEST, the test changes."""
    from rich import box
    from rich.table import Table

    from cnnbal.compare import TEST_METRICS

    table = Table(
        box=box.SIMPLE_HEAD,  # a rule under the header, one space between columns
        padding=(0, 0),
        show_edge=False,
    )
    table.add_column("method", no_wrap=True)
    table.add_column("ok", justify="center")
    for header in _CV_HEADERS.values():
        table.add_column(header, justify="right", no_wrap=True)
    if test is not None:
        for name in TEST_METRICS:
            table.add_column(_TEST_HEADERS[name], justify="right", no_wrap=True)
    table.add_column("chg\nfit s", justify="right", no_wrap=True)

    raw_cv = result.raw_cv
    raw_row = ["raw (acc. %)", ""] + [_pct(raw_cv[s]) for s in _CV_HEADERS]
    if test is not None:
        raw_row += [_pct(result.raw_test[name]) for name in TEST_METRICS]
    table.add_row(*raw_row, "", style="dim", end_section=True)
    for item in result.results:
        recommended = item.method == result.recommended
        change = item.cv.mean_change
        cells = [
            f"{item.method}{' *' if recommended else ''}\n  {_hyper(item)}",
            "✓" if item.eligible else "✗",
        ]
        cells += [_pts(change[s]) for s in _CV_HEADERS]
        if item.test is not None:
            for name in TEST_METRICS:
                low, high = item.test.intervals.get(name, (float("nan"), float("nan")))
                cells.append(f"{_pts(item.test.change(name))}\n{_interval(low, high)}")
        changed = "-" if item.test is None else f"{item.test.n_changed:,}"
        cells.append(f"{changed}\n{item.fit.fit_seconds:.2f}")
        style = "bold green" if recommended else (None if item.eligible else "red")
        table.add_row(*cells, style=style, end_section=True)
    return table


def _print_human(console, result, val: Path, test: Path | None, seconds: float) -> None:
    head = f"VAL {val.name} (n={result.n_val:,}, K={result.n_classes})"
    if test is not None:
        head += f", TEST {test.name} (n={result.n_test:,})"
    console.print(f"{head}; cv: nested {result.n_folds}-fold CV on VAL", highlight=False)
    console.print(build_table(result, val, test))
    lines = [
        "cv: mean change vs raw in points over the held-out folds (each fold refits the method, "
        "its CV choice included). ok: CV total accuracy at most "
        f"{result.max_total_drop:g} pts below raw.",
    ]
    if test is not None:
        lines.append(
            f"test: change vs raw in points, below it the 95% paired bootstrap interval "
            f"({result.n_boot:,} resamples); low-20v: the 20% classes weakest on VAL. TEST was "
            "not used for any choice."
        )
    lines.append(
        "chg: test predictions changed; fit s: seconds to fit on all of VAL, CV choice of the "
        "hyper-parameter included (* recommended)."
    )
    # sentences are not cut at TABLE_WIDTH (a CI log greps "Recommended ... METHOD")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(_decision(result), highlight=False, soft_wrap=True)
    console.print(
        f"compare: {len(result.results)} methods in {seconds:.1f} s",
        highlight=False,
        soft_wrap=True,
    )


def _decision(result) -> str:
    from cnnbal.sweep import OBJECTIVES

    score = OBJECTIVES[result.objective]
    limit = f"CV total within {result.max_total_drop:g} pts of raw"
    if result.recommended is None:
        return (
            f"Recommendation (VAL only, best CV {result.objective}, {limit}): none beats the "
            "raw outputs; keep them (no correction)."
        )
    item = result.result(result.recommended)
    change = item.cv.mean_change
    return (
        f"Recommended (VAL only, best CV {result.objective}, {limit}): {item.method} "
        f"({_hyper(item)}): CV {result.objective} {_pts(change[score])} pts, total "
        f"{_pts(change['total_accuracy'])} pts."
    )
