"""The ``cnnbal`` command line: a thin layer over :mod:`cnnbal.pipeline`.

Exit codes: 0 success; 1 an ``evaluate`` check failed (``--max-total-drop``,
``--min-low20-gain``); 2 bad input or usage (one line on stderr).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cnnbal import __version__
from cnnbal._cli_common import (
    ClassesOpt,
    JsonOpt,
    LabelsOpt,
    LogitsOpt,
    PrefixOpt,
    handle_errors,
    print_json,
    read_options,
    show_progress,
    stderr_console,
    stdout_console,
)
from cnnbal.cli_compare import compare_command
from cnnbal.cli_extract import extract_command
from cnnbal.cli_sweep import Objective, sweep_command

app = typer.Typer(
    name="cnnbal",
    help="More balanced per-class accuracy for a trained classifier, after training "
    "(Choi 2017: an affine correction H after the softmax).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cnnbal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """cnnbal: fit, apply and evaluate an output correction on saved model outputs."""


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.2f}%"


def _pts(delta: float) -> str:
    if delta != delta:
        return "-"
    return f"{100 * delta:+.2f} pts"


# ------------------------------------------------------------------ fit


@app.command("fit")
@handle_errors
def fit_command(
    val: Annotated[Path, typer.Argument(help="Validation outputs with labels.")],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Write the correction artifact here (.npz)."),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="elaborated (the paper's default), naive, logit-adjust, class-balanced-ce, "
            "class-dro, prior-match, worst20-ascent, temperature or vector-scaling "
            "(README: Choosing a correction).",
        ),
    ] = "elaborated",
    r_low: Annotated[
        float | None,
        typer.Option(
            "--r-low", help="elaborated: competitive if true-class prob above this [0.1]."
        ),
    ] = None,
    r_high: Annotated[
        float | None,
        typer.Option(
            "--r-high", help="elaborated: competitive if max prob below this; the apply gate [0.8]."
        ),
    ] = None,
    beta: Annotated[
        float | None,
        typer.Option("--beta", help="elaborated: weight exponent acc_k ** -beta [1.5]."),
    ] = None,
    alpha: Annotated[
        float | None, typer.Option("--alpha", help="elaborated: identity padding strength [3].")
    ] = None,
    tau: Annotated[
        float | None, typer.Option("--tau", help="logit-adjust: b = -tau log prior [by CV].")
    ] = None,
    l2: Annotated[
        float | None,
        typer.Option("--l2", help="class-balanced-ce: L2 weight shrinking b toward 0 [by CV]."),
    ] = None,
    eta: Annotated[
        float | None,
        typer.Option("--eta", help="class-dro: soft-max temperature over classes [by CV]."),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", help="prior-match: softmax temperature T [by CV]."),
    ] = None,
    shrink: Annotated[
        float | None,
        typer.Option("--shrink", help="worst20-ascent: b <- shrink * b, in [0, 1] [by CV]."),
    ] = None,
    prior: Annotated[
        str,
        typer.Option(
            "--prior",
            help="prior-match's target: uniform, val (label frequencies) or a FILE of K "
            "weights (.npy or text).",
        ),
    ] = "uniform",
    unlabelled: Annotated[
        bool,
        typer.Option("--unlabelled", help="prior-match: fit without labels (e.g. on TEST itself)."),
    ] = False,
    folds: Annotated[int, typer.Option("--folds", help="CV folds choosing hyper-parameters.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the CV fold assignment.")] = 0,
    objective: Annotated[
        Objective,
        typer.Option("--objective", help="What CV maximises (as in sweep)."),
    ] = Objective.worst20,
    max_total_drop: Annotated[
        float,
        typer.Option(
            "--max-total-drop",
            help="CV may only choose values whose CV total accuracy is at most this many "
            "points below raw (as in sweep).",
            metavar="PTS",
        ),
    ] = 0.5,
    logits: LogitsOpt = False,
    labels: LabelsOpt = None,
    prob_prefix: PrefixOpt = None,
    classes: ClassesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fit a correction on validation outputs (the paper's H by default; docs/method.md).

    Hyper-parameters not given are chosen by stratified k-fold cross-validation
    on VAL, with sweep's objective and total-accuracy limit; the output says
    which value CV chose and its CV score.
    """
    from cnnbal.errors import CnnbalError
    from cnnbal.io import check_not_input, read_outputs
    from cnnbal.methods import HYPERPARAMS, METHOD_NAMES

    if method not in METHOD_NAMES:
        raise CnnbalError(f"--method must be one of {', '.join(METHOD_NAMES)}, got {method!r}")
    paper = {"r_low": r_low, "r_high": r_high, "beta": beta, "alpha": alpha}
    given = {"tau": tau, "l2": l2, "eta": eta, "temperature": temperature, "shrink": shrink}
    given = {name: value for name, value in given.items() if value is not None}
    for name in given:
        if name not in HYPERPARAMS[method]:
            owners = [m for m, h in HYPERPARAMS.items() if name in h]
            raise CnnbalError(f"--{name} applies to {' and '.join(owners)}, not {method}")
    for name, value in paper.items():
        if value is not None and method != "elaborated":
            flag = "--" + name.replace("_", "-")
            raise CnnbalError(f"{flag} applies to the elaborated fit, not {method}")
    if method != "prior-match" and (prior != "uniform" or unlabelled):
        flag = "--unlabelled" if unlabelled else "--prior"
        raise CnnbalError(f"{flag} applies to prior-match, not {method}")
    if folds < 2:
        raise CnnbalError(f"--folds: need at least 2 folds, got {folds}")
    if not max_total_drop >= 0:
        raise CnnbalError(f"--max-total-drop: must be >= 0 points, got {max_total_drop}")
    if output is not None:
        check_not_input(output, val)
        for other in (labels, classes, None if prior in ("uniform", "val") else Path(prior)):
            if other is not None:
                check_not_input(output, other)
    start = time.perf_counter()
    outputs = read_outputs(
        val, read_options(logits, labels, prob_prefix, classes), require_labels=not unlabelled
    )
    if method in ("elaborated", "naive"):
        _fit_paper(outputs, method, paper, output, val, start, as_json)
        return
    from cnnbal.pipeline import fit_method_outputs, read_prior

    target = prior if prior in ("uniform", "val") else read_prior(prior, outputs.n_classes)
    artifact, fitted = fit_method_outputs(
        outputs,
        method,
        hyper=given,
        prior=target,
        unlabelled=unlabelled,
        n_folds=folds,
        seed=seed,
        objective=objective.value,
        max_total_drop=max_total_drop,
        provenance={"prior": prior} if method == "prior-match" else None,
    )
    if output is not None:
        from cnnbal.artifact import save_artifact

        save_artifact(output, artifact)
    _report_fit(artifact, fitted.warnings, fitted, output, val, start, as_json)


def _fit_paper(outputs, method, paper, output, val, start, as_json) -> None:
    """elaborated / naive: the paper's fit, as before the other methods arrived."""
    from cnnbal.artifact import save_artifact
    from cnnbal.core import DEFAULT_PARAMS, FitParams
    from cnnbal.pipeline import fit_outputs

    given = {name: value for name, value in paper.items() if value is not None}
    params = FitParams(**{**DEFAULT_PARAMS.as_dict(), **given})
    artifact, notes = fit_outputs(outputs, method, params)
    if output is not None:
        save_artifact(output, artifact)
    _report_fit(artifact, notes, None, output, val, start, as_json)


def _report_fit(artifact, notes, fitted, output, val, start, as_json) -> None:
    seconds = time.perf_counter() - start
    summary = artifact.describe()
    summary.update(
        {"input": str(val), "output": str(output) if output else None, "seconds": seconds}
    )
    summary["warnings"] = list(notes)
    if fitted is not None:
        summary.update({"hyper": fitted.hyper, "chosen_by_cv": fitted.chosen_by_cv})
        summary["cv"] = fitted.cv
    err = stderr_console()
    for note in notes:
        err.print(f"[yellow]warning:[/] {note}", highlight=False)
    if as_json:
        print_json(summary)
        return
    out = stdout_console()
    acc_min, acc_max = summary["val_accuracy_min"], summary["val_accuracy_max"]
    params = ", ".join(f"{k}={v:g}" for k, v in sorted(artifact.params.items()))
    params = params or "no hyper-parameters"
    out.print(
        f"[bold]fit[/] {val.name}: {artifact.method} -> {artifact.kind} ({params})",
        highlight=False,
    )
    if fitted is not None and fitted.cv is not None:
        out.print(f"  {_cv_choice(fitted.cv)}", highlight=False)
    counts = f"  samples {artifact.n_val:,}, classes {artifact.n_classes}"
    if artifact.kind == "affine":
        share = artifact.n_competitive / max(artifact.n_val, 1)
        counts += f", competitive {artifact.n_competitive:,} ({100 * share:.1f}%)"
    out.print(counts, highlight=False)
    accuracy = (
        f"per-class val accuracy {_pct(acc_min)} .. {_pct(acc_max)}"
        if acc_min is not None
        else "fitted without labels"
    )
    out.print(f"  {accuracy}; {1000 * seconds:.0f} ms", highlight=False)
    out.print(f"  {_what_it_does(summary)}", highlight=False)
    if output is not None:
        out.print(f"  wrote {output}", highlight=False)


def _what_it_does(summary: dict) -> str:
    """One phrase per kind: how far the correction is from doing nothing."""
    kind = summary["kind"]
    if kind == "affine":
        return f"|H - [I 0]| = {summary['h_distance_from_identity']:.3f}"
    if kind == "logit_bias":
        return (
            f"bias range {summary['bias_range']:.3f} (lowest {summary['bias_lowest_class']}, "
            f"highest {summary['bias_highest_class']}), T = {summary['temperature']:g}"
        )
    if kind == "temperature":
        return f"T = {summary['temperature']:.3f} (never changes a prediction)"
    return (
        f"scale {summary['scale_min']:.3f} .. {summary['scale_max']:.3f}, "
        f"bias {summary['bias_min']:.3f} .. {summary['bias_max']:.3f}"
    )


def _cv_choice(cv: dict) -> str:
    """'eta=0.3 chosen by 5-fold CV: worst20 78.89% vs raw 69.58%, total +1.12 pts'."""
    from cnnbal.sweep import OBJECTIVES

    score = OBJECTIVES[cv["objective"]]
    grid = list(cv["grid"])
    chosen = cv.get("chosen")
    if chosen is None or chosen != chosen or chosen not in grid:
        return (
            f"{cv['n_folds']}-fold CV: no {cv['name']} of {len(grid)} keeps total accuracy "
            f"within {cv['max_total_drop']:g} pts of raw: no correction (identity)"
        )
    i = grid.index(chosen)
    raw = cv["raw_mean_scores"]
    mean = cv["mean_scores"]
    total = 100 * (mean["total_accuracy"][i] - raw["total_accuracy"])
    verdict = "" if cv.get("beats_raw", True) else " (does not beat raw)"
    return (
        f"{cv['name']}={chosen:g} chosen by {cv['n_folds']}-fold CV: {cv['objective']} "
        f"{_pct(mean[score][i])} vs raw {_pct(raw[score])}, total {total:+.2f} pts{verdict}"
    )


# ------------------------------------------------------------------ apply


@app.command("apply")
@handle_errors
def apply_command(
    h: Annotated[Path, typer.Argument(help="The H artifact from `cnnbal fit`.")],
    input: Annotated[Path, typer.Argument(help="Outputs to correct (labels optional).")],
    output: Annotated[
        Path,
        typer.Option("-o", "--output", help="Where to write (same family: table or array)."),
    ],
    raw_scores: Annotated[
        bool,
        typer.Option(
            "--raw-scores", help="Keep the affine scores (may be < 0) instead of renormalising."
        ),
    ] = False,
    logits: LogitsOpt = False,
    labels: LabelsOpt = None,
    prob_prefix: PrefixOpt = None,
    classes: ClassesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Correct outputs with H, streaming; writes OUTPUT atomically."""
    from cnnbal.pipeline import apply_file

    start = time.perf_counter()
    options = read_options(logits, labels, prob_prefix, classes)
    if show_progress() and not as_json:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("apply"),
            BarColumn(),
            TextColumn("{task.completed:,} rows"),
            TimeElapsedColumn(),
            console=stderr_console(),
            transient=True,
        ) as bar:
            task = bar.add_task("apply", total=None)
            report = apply_file(
                h,
                input,
                output,
                options=options,
                raw_scores=raw_scores,
                progress=lambda n: bar.update(task, completed=n),
            )
    else:
        report = apply_file(h, input, output, options=options, raw_scores=raw_scores)
    seconds = time.perf_counter() - start
    payload = {
        "input": str(input),
        "output": str(report.output),
        "rows": report.n_rows,
        "corrected": report.n_corrected,
        "changed_predictions": report.n_changed,
        "seconds": seconds,
    }
    if as_json:
        print_json(payload)
        return
    stderr_console().print(
        f"apply: {report.n_rows:,} rows, {report.n_corrected:,} touched by the correction, "
        f"{report.n_changed:,} predictions changed; wrote {report.output} "
        f"in {seconds:.2f} s",
        highlight=False,
    )


# ------------------------------------------------------------------ evaluate


@app.command("evaluate")
@handle_errors
def evaluate_command(
    test: Annotated[Path, typer.Argument(help="Labelled outputs to evaluate on.")],
    h: Annotated[
        Path | None, typer.Option("-H", "--h", help="The H artifact (omit: raw only).")
    ] = None,
    per_class: Annotated[
        bool, typer.Option("--per-class", help="Also show per-class accuracy.")
    ] = False,
    max_total_drop: Annotated[
        float | None,
        typer.Option(
            "--max-total-drop",
            help="Exit 1 if total accuracy falls by more than PTS percentage points.",
            metavar="PTS",
        ),
    ] = None,
    min_low20_gain: Annotated[
        float | None,
        typer.Option(
            "--min-low20-gain",
            help="Exit 1 if the low-20% accuracy gains less than PTS percentage points.",
            metavar="PTS",
        ),
    ] = None,
    logits: LogitsOpt = False,
    labels: LabelsOpt = None,
    prob_prefix: PrefixOpt = None,
    classes: ClassesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare raw and corrected metrics; CI checks with exit code 1."""
    from cnnbal.pipeline import evaluate_file
    from cnnbal.report import comparison_payload, comparison_table, per_class_table

    outputs, artifact, comparison = evaluate_file(
        test, h, options=read_options(logits, labels, prob_prefix, classes)
    )
    names = outputs.class_names or (artifact.class_names if artifact else None)
    checks = _ci_checks(comparison, max_total_drop, min_low20_gain)
    if as_json:
        payload = comparison_payload(comparison, names)
        payload.update(
            {
                "input": str(test),
                "h": str(h) if h else None,
                "checks": checks,
                "passed": all(c["passed"] for c in checks),
            }
        )
        print_json(payload)
    else:
        out = stdout_console()
        title = f"{test.name}: {comparison.n_samples:,} samples, {outputs.n_classes} classes"
        if h is None:
            title += " (no H: raw only)"
        out.print(comparison_table(comparison, title=title))
        if per_class:
            out.print(per_class_table(comparison, names, artifact))
    failed = [c for c in checks if not c["passed"]]
    err = stderr_console()
    for check in checks:
        style = "green" if check["passed"] else "bold red"
        status = "ok" if check["passed"] else "FAILED"
        err.print(f"[{style}]{status}[/]: {check['message']}", highlight=False)
    if failed:
        raise typer.Exit(1)


def _ci_checks(comparison, max_total_drop, min_low20_gain) -> list[dict]:
    checks = []
    if max_total_drop is not None:
        raw, new = comparison.metrics["total_accuracy"]
        drop = 100 * (raw - new)
        checks.append(
            {
                "name": "max_total_drop",
                "limit_pts": max_total_drop,
                "value_pts": drop,
                "passed": drop <= max_total_drop + 1e-9,
                "message": f"total accuracy dropped {drop:.2f} pts (limit --max-total-drop "
                f"{max_total_drop:g})",
            }
        )
    if min_low20_gain is not None:
        raw, new = comparison.metrics["low20_accuracy"]
        gain = 100 * (new - raw)
        checks.append(
            {
                "name": "min_low20_gain",
                "limit_pts": min_low20_gain,
                "value_pts": gain,
                "passed": gain >= min_low20_gain - 1e-9,
                "message": f"low-20% accuracy gained {gain:.2f} pts (required --min-low20-gain "
                f"{min_low20_gain:g})",
            }
        )
    return checks


# ------------------------------------------------------------------ info


@app.command("info")
@handle_errors
def info_command(
    h: Annotated[Path, typer.Argument(help="An H artifact.")],
    as_json: JsonOpt = False,
) -> None:
    """Describe an H artifact: method, parameters, provenance, validation accuracy."""
    from cnnbal.artifact import load_artifact

    artifact = load_artifact(h)
    summary = artifact.describe()
    if as_json:
        print_json(summary)
        return
    from cnnbal.report import info_table

    stdout_console().print(info_table(summary, title=str(h)))


app.command("sweep")(sweep_command)
app.command("compare")(compare_command)
app.command("extract")(extract_command)


def main() -> None:
    """Console-script entry point."""
    app()
