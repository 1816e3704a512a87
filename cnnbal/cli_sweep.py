"""``cnnbal sweep``: choose r_low, r_high, beta, alpha by cross-validation on VAL only.

A thin layer over :mod:`cnnbal.sweep` (the computation), :mod:`cnnbal.plot`
(the figure) and :mod:`cnnbal.artifact` (the H file). Registered by
:mod:`cnnbal.cli` as ``app.command("sweep")(sweep_command)``.

Exit codes: 0 done; 1 ``-o`` was asked for but no configuration is eligible,
so no H was written (the recommendation is the raw outputs); 2 a user error.
"""

from __future__ import annotations

import time
import warnings
from enum import Enum
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
    parse_floats,
    print_json,
    read_options,
    report_renormalized,
    show_progress,
    stderr_console,
    stdout_console,
)
from cnnbal.errors import CnnbalError

__all__ = ["sweep_command"]


class Mode(str, Enum):
    grid = "grid"
    curves = "curves"


class Objective(str, Enum):
    worst20 = "worst20"
    low20_val = "low20_val"
    balanced = "balanced"
    total = "total"


_SCORE_HEADERS = {
    "total_accuracy": "total",
    "worst20_accuracy": "worst20",
    "balanced_accuracy": "balanced",
    "low20_val_accuracy": "low20_val",
}


@handle_errors
def sweep_command(
    val: Annotated[
        Path,
        typer.Argument(
            help="Validation outputs with labels (.npz/.npy/.parquet/.csv): the only data "
            "the choice sees.",
            show_default=False,
            metavar="VAL",
        ),
    ],
    test: Annotated[
        Path | None,
        typer.Option(
            "--test",
            help="Also evaluate the chosen H on these outputs, reported separately. Never "
            "used for the choice.",
            metavar="FILE",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Write the H refit on all of VAL with the chosen parameters (.npz).",
            metavar="FILE",
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Write the Figure-3-style curves (one panel per parameter) as PNG; "
            "needs matplotlib (the plot extra).",
            metavar="FILE",
        ),
    ] = None,
    r_low: Annotated[
        str, typer.Option("--r-low", help="Comma-separated R_low values.", metavar="LIST")
    ] = "0.05,0.1,0.15",
    r_high: Annotated[
        str, typer.Option("--r-high", help="Comma-separated R_high values.", metavar="LIST")
    ] = "0.7,0.8,0.9",
    beta: Annotated[
        str, typer.Option("--beta", help="Comma-separated beta values.", metavar="LIST")
    ] = "1,1.5,2",
    alpha: Annotated[
        str, typer.Option("--alpha", help="Comma-separated alpha values.", metavar="LIST")
    ] = "2,3,4",
    mode: Annotated[
        Mode,
        typer.Option(
            "--mode",
            help="grid: every combination. curves: the paper's one-at-a-time lines "
            "through --center.",
            metavar="grid|curves",
        ),
    ] = Mode.grid,
    center: Annotated[
        str,
        typer.Option(
            "--center",
            help="r_low,r_high,beta,alpha: the centre of --mode curves.",
            metavar="LIST",
        ),
    ] = "0.1,0.8,1.5,3",
    folds: Annotated[
        int,
        typer.Option("--folds", help="Stratified cross-validation folds (>= 2).", metavar="N"),
    ] = 5,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the fold assignment (>= 0).", metavar="N")
    ] = 0,
    objective: Annotated[
        Objective,
        typer.Option(
            "--objective",
            help="What to maximise (cross-validated mean): worst20 = mean accuracy of the "
            "20% worst classes after correction; low20_val = the paper's low-20% on classes "
            "picked by training-fold accuracy; balanced = mean per-class recall; total.",
            metavar="worst20|low20_val|balanced|total",
        ),
    ] = Objective.worst20,
    max_total_drop: Annotated[
        float,
        typer.Option(
            "--max-total-drop",
            help="Eligible only if cross-validated total accuracy is at most PTS "
            "percentage points below raw.",
            metavar="PTS",
        ),
    ] = 0.5,
    top: Annotated[
        int,
        typer.Option("--top", help="Configurations shown in the table.", min=1, metavar="N"),
    ] = 10,
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
    """Choose R_low, R_high, beta and alpha by stratified k-fold cross-validation on VAL.

    Fits H on k-1 folds, scores the held-out fold, averages; picks the best mean
    objective among configurations that keep total accuracy within
    --max-total-drop points of raw. TEST (optional) only reports how the choice
    does on unseen data.
    """
    from cnnbal import sweep as sw

    started = time.perf_counter()
    grid = {
        "r_low": parse_floats(r_low, "--r-low"),
        "r_high": parse_floats(r_high, "--r-high"),
        "beta": parse_floats(beta, "--beta"),
        "alpha": parse_floats(alpha, "--alpha"),
    }
    center_values = parse_floats(center, "--center")
    if len(center_values) != 4:
        raise CnnbalError(
            f"--center: expected 4 numbers r_low,r_high,beta,alpha, got {len(center_values)}"
        )
    from cnnbal.core import FitParams

    center_params = FitParams(*center_values)
    if mode is Mode.grid:
        configs = sw.grid_configs(**grid)
    else:
        configs = sw.curve_configs(center_params, **grid)
    if folds < 2:
        raise CnnbalError(f"--folds: need at least 2 folds, got {folds}")
    if seed < 0:
        raise CnnbalError(f"--seed: must be >= 0, got {seed}")
    if not max_total_drop >= 0:
        raise CnnbalError(f"--max-total-drop: must be >= 0 points, got {max_total_drop}")
    # fail before the long part, not after it
    if plot is not None:
        from cnnbal.plot import require_matplotlib

        require_matplotlib()
    from cnnbal.io import check_outputs

    check_outputs(
        {"-o": output, "--plot": plot},
        {
            "VAL": val,
            "--test": test,
            "--labels": labels,
            "--test-labels": test_labels,
            "--classes": classes,
        },
        suffixes={"-o": (".npz",), "--plot": (".png",)},
    )

    import dataclasses

    from cnnbal.io import file_sha256, read_outputs

    options = read_options(
        logits,
        labels,
        prob_prefix,
        classes,
        renormalize=renormalize,
        label_column=label_column,
        score_column=score_column,
        delimiter=delimiter,
    )
    val_out = read_outputs(val, options)
    report_renormalized(val_out.n_renormalized, val.name, quiet)
    test_out = None
    if test is not None:
        if test.suffix.lower() == ".npy" and test_labels is None:
            raise CnnbalError(f"{test.name}: a .npy --test file needs --test-labels FILE.npy")
        # the same reading flags, its own labels file, and VAL's class names for
        # string labels when TEST has none
        test_options = dataclasses.replace(
            options,
            labels_path=test_labels,
            fallback_class_names=(
                tuple(val_out.class_names) if val_out.class_names is not None else None
            ),
        )
        test_out = read_outputs(test, test_options)
        report_renormalized(test_out.n_renormalized, test.name, quiet)
        if test_out.n_classes != val_out.n_classes:
            raise CnnbalError(
                f"{test.name}: {test_out.n_classes} classes, but {val.name} has {val_out.n_classes}"
            )

    human = stderr_console(quiet) if json_out else stdout_console(quiet)
    notes = stderr_console(quiet)
    result = _run(
        sw, val_out, configs, folds, seed, objective.value, max_total_drop, mode, quiet=quiet
    )

    refit = None
    if result.chosen is not None and (output is not None or test_out is not None):
        from cnnbal.core import fit_elaborated

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # shown from refit.warnings below
            refit = fit_elaborated(val_out.probs, val_out.labels, result.chosen)

    test_report = None
    if test_out is not None and refit is not None:
        test_report = _evaluate_test(refit, test_out)

    written = None
    if output is not None and refit is not None:
        from cnnbal.artifact import Artifact, save_artifact

        artifact = Artifact.from_fit(
            refit,
            class_names=val_out.class_names,
            input_sha256=file_sha256(val),
            input_name=val.name,
            provenance={"sweep": _provenance(result, grid, center_params)},
        )
        written = save_artifact(output, artifact)

    plotted = None
    if plot is not None:
        from cnnbal.plot import plot_sweep

        plotted = plot_sweep(result, plot, title=val.name)

    for note in result.warnings:
        notes.print(f"[yellow]note:[/] {note}", highlight=False)
    if refit is not None:
        refit_notes = refit.warnings
        if val_out.class_names is not None:
            from cnnbal.pipeline import named_class_notes

            refit_notes = named_class_notes(refit, val_out.class_names)
        for note in refit_notes:
            notes.print(f"[yellow]note (refit on all of VAL):[/] {note}", highlight=False)

    if json_out:
        print_json(
            {
                "val": {
                    "path": str(val),
                    "n_samples": val_out.n_samples,
                    "n_classes": val_out.n_classes,
                },
                "grid": grid if mode is Mode.grid else None,
                "curves": (
                    {**grid, "center": center_params.as_dict()} if mode is Mode.curves else None
                ),
                "sweep": result.to_dict(),
                "test": (
                    None
                    if test_report is None
                    else {k: v for k, v in test_report.items() if k != "comparison"}
                ),
                "output": None if written is None else str(written),
                "plot": None if plotted is None else str(plotted),
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
    _print_human(human, result, top, test_report, test, output, written, plotted)
    if output is not None and written is None:
        # one line on stderr, whatever --quiet or --json say: exit 1 is a failed check
        typer.echo(
            f"FAILED: sweep on {val.name}: no configuration keeps cross-validated total "
            f"accuracy within --max-total-drop {max_total_drop:g} points of raw. Nothing "
            f"written to {output}; keep the raw outputs, or raise --max-total-drop to accept "
            "a larger loss.",
            err=True,
        )
        raise typer.Exit(1)


def _run(sw, val_out, configs, folds, seed, objective, max_total_drop, mode, *, quiet=False):
    kwargs = {
        "n_folds": folds,
        "seed": seed,
        "objective": objective,
        "max_total_drop": max_total_drop,
        "mode": mode.value,
        "center": configs[0] if mode is Mode.curves else None,
    }
    if quiet or not show_progress():
        return sw.run_sweep(val_out.probs, val_out.labels, configs, **kwargs)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        transient=True,
    ) as bar:
        task = bar.add_task(
            f"sweep: {len(configs)} configurations x {folds} folds",
            total=len(configs) * folds,
        )
        return sw.run_sweep(
            val_out.probs,
            val_out.labels,
            configs,
            progress=lambda done, total: bar.update(task, completed=done),
            **kwargs,
        )


def _evaluate_test(refit, test_out) -> dict:
    """The chosen H on TEST: raw vs corrected (after the choice; no influence on it)."""
    from cnnbal.core import apply_correction
    from cnnbal.metrics import compare
    from cnnbal.report import comparison_payload

    corrected = apply_correction(refit.H, test_out.probs, gate=refit.apply_gate)
    comparison = compare(
        test_out.probs, corrected, test_out.labels, val_class_accuracy=refit.class_accuracy
    )
    payload = comparison_payload(comparison, test_out.class_names)
    payload.update({"path": str(test_out.path), "params": refit.params.as_dict()})
    payload["comparison"] = comparison  # for the table; dropped from --json
    return payload


def _provenance(result, grid: dict, center) -> dict:
    """What the artifact records about the sweep that chose its parameters."""
    from cnnbal.sweep import PARAM_NAMES, SCORE_NAMES

    summary = result.to_dict(include_configs=False)
    table = [
        [*(getattr(result.configs[i], n) for n in PARAM_NAMES)]
        + [float(result.mean(s)[i]) for s in SCORE_NAMES]
        + [bool(result.eligible[i])]
        for i in result.ranking()
    ]
    summary.update(
        {
            "grid": {k: sorted(set(v)) for k, v in grid.items()},
            "center": center.as_dict() if result.mode == "curves" else None,
            "cv_means_columns": [*PARAM_NAMES, *SCORE_NAMES, "eligible"],
            "cv_means": table,
        }
    )
    return summary


# ---------------------------------------------------------------- human output


def _pct(value: float) -> str:
    return "-" if value != value else f"{100 * value:.2f}"


def _cell(mean: float, std: float) -> str:
    return f"{_pct(mean)}±{100 * std:.1f}"


def _print_human(console, result, top, test_report, test, output, written, plotted) -> None:
    from rich import box
    from rich.table import Table

    from cnnbal.sweep import PARAM_NAMES, SCORE_NAMES

    objective = result.objective_score
    raw_obj = result.raw_mean(objective)
    title = (
        f"{result.n_folds}-fold CV on validation (n={result.n_samples}, "
        f"K={result.n_classes}): best {min(top, len(result.configs))} of "
        f"{len(result.configs)} by {result.objective}; accuracy %, mean±std over folds"
    )
    table = Table(
        title=title,
        title_justify="left",
        # as wide as the title: rich wraps a title wider than its table, also in a pipe
        min_width=len(title),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("#", justify="right")
    table.add_column("r_low/r_high/β/α", no_wrap=True)
    ordered = [objective, *(s for s in SCORE_NAMES if s != objective)]
    for score in ordered:
        header = _SCORE_HEADERS[score] + ("*" if score == objective else "")
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("Δ*", justify="right")
    table.add_column("ok", justify="center")
    table.add_row(
        "raw",
        "-",
        *[_cell(result.raw_mean(s), result.raw_std(s)) for s in ordered],
        "",
        "",
        style="dim",
    )
    for rank, index in enumerate(result.ranking()[:top], start=1):
        config = result.configs[index]
        gain = 100 * (result.mean(objective)[index] - raw_obj)
        eligible = bool(result.eligible[index])
        table.add_row(
            str(rank),
            "/".join(f"{getattr(config, n):g}" for n in PARAM_NAMES),
            *[_cell(result.mean(s)[index], result.std(s)[index]) for s in ordered],
            f"{gain:+.2f}",
            "✓" if eligible else "✗",
            style="bold green" if index == result.choice.index else (None if eligible else "red"),
        )
    console.print(table)
    console.print(
        f"* objective; Δ* its change vs raw in points. ok: eligible, mean total accuracy at "
        f"most {result.max_total_drop:g} points below raw ({int(result.eligible.sum())} of "
        f"{len(result.configs)} are).",
        highlight=False,
    )
    _print_decision(console, result, output, written)
    if test_report is not None:
        _print_test(console, test_report, test)
    elif test is not None:
        console.print(f"{test.name}: nothing to evaluate (no configuration chosen).")
    if plotted is not None:
        console.print(f"wrote {plotted}", highlight=False)


def _print_decision(console, result, output, written) -> None:
    objective = result.objective_score
    raw_obj = result.raw_mean(objective)
    raw_total = result.raw_mean("total_accuracy")
    chosen = result.chosen
    if chosen is None:
        best = int(result.ranking()[0])
        best_total = 100 * (result.mean("total_accuracy").max() - raw_total)
        console.print(
            f"[bold]No configuration is eligible[/]: every one loses more than "
            f"{result.max_total_drop:g} points of cross-validated total accuracy (the best "
            f"loses {-best_total:.2f}; best by {result.objective}: "
            f"{_params(result.configs[best])}). Recommendation: keep the raw outputs "
            "(no correction).",
            highlight=False,
        )
        return
    index = result.choice.index
    gain = 100 * (result.mean(objective)[index] - raw_obj)
    spread = 100 * result.gain_std(objective)[index]
    total_gain = 100 * (result.mean("total_accuracy")[index] - raw_total)
    detail = (
        f"{result.objective} {_pct(result.mean(objective)[index])}% vs raw {_pct(raw_obj)}% "
        f"({gain:+.2f} points, fold spread of the gain ±{spread:.2f}); total {total_gain:+.2f} "
        "points"
    )
    if result.choice.beats_raw:
        console.print(f"[bold]Chosen[/]: {_params(chosen)}: {detail}.", highlight=False)
        if spread > 0 and gain < spread:
            console.print(
                "The gain is smaller than its spread across folds: weak evidence that the "
                "correction helps on new data.",
                highlight=False,
            )
    else:
        console.print(
            f"[bold]No configuration beats raw[/] on {result.objective} in cross-validation "
            f"(best eligible: {_params(chosen)}: {detail}). Recommendation: keep the raw "
            "outputs (no correction).",
            highlight=False,
        )
    edges = result.edge_parameters()
    if edges:
        hints = ", ".join(
            f"{name}={getattr(chosen, name):g} is the {side} value swept"
            for name, side in edges.items()
        )
        console.print(f"At the edge of the grid: {hints}; the optimum may lie beyond.")
    if written is not None:
        suffix = "" if result.choice.beats_raw else " (it does not beat raw; see above)"
        console.print(
            f"wrote {written}: H refit on all of VAL with the chosen parameters{suffix}",
            highlight=False,
        )


def _print_test(console, report: dict, test: Path) -> None:
    """The same table as `cnnbal evaluate`, titled as a report that chose nothing."""
    from cnnbal.report import COMPARISON_NOTE, comparison_table

    title = (
        f"{test.name} (n={report['n_samples']:,}): the chosen H on held-out data. "
        "Not used for the choice."
    )
    console.print(comparison_table(report["comparison"], title=title))
    console.print(COMPARISON_NOTE, highlight=False)


def _params(config) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in config.as_dict().items())
