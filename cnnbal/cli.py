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
from cnnbal.cli_extract import extract_command
from cnnbal.cli_sweep import sweep_command

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
        Path | None, typer.Option("-o", "--output", help="Write the H artifact here (.npz).")
    ] = None,
    method: Annotated[
        str, typer.Option("--method", help="elaborated (the paper's default) or naive.")
    ] = "elaborated",
    r_low: Annotated[
        float, typer.Option("--r-low", help="Competitive: true-class prob above this.")
    ] = 0.1,
    r_high: Annotated[
        float,
        typer.Option("--r-high", help="Competitive: max prob below this; also the apply gate."),
    ] = 0.8,
    beta: Annotated[float, typer.Option("--beta", help="Weight exponent: acc_k ** -beta.")] = 1.5,
    alpha: Annotated[float, typer.Option("--alpha", help="Identity padding strength.")] = 3.0,
    max_total_drop: Annotated[
        float,
        typer.Option(
            "--max-total-drop",
            help="Fit check: refuse (exit 1, write nothing) if the 5-fold cross-validated "
            "total accuracy falls more than PTS points below raw.",
            metavar="PTS",
        ),
    ] = 0.5,
    force: Annotated[
        bool, typer.Option("--force", help="Write H even if the fit check fails.")
    ] = False,
    logits: LogitsOpt = False,
    labels: LabelsOpt = None,
    prob_prefix: PrefixOpt = None,
    classes: ClassesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fit the correction H on validation outputs (docs/method.md 1-2).

    Then checks it: 5-fold cross-validation on VAL estimates what H does to new
    data; if total accuracy falls more than --max-total-drop points, nothing is
    written and the exit code is 1 (--force writes it anyway).
    """
    import dataclasses

    from cnnbal.artifact import save_artifact
    from cnnbal.check import check_fit, fit_function
    from cnnbal.core import METHODS, FitParams
    from cnnbal.errors import CnnbalError
    from cnnbal.io import check_outputs, read_outputs
    from cnnbal.pipeline import fit_outputs

    if method not in METHODS:
        raise CnnbalError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not max_total_drop >= 0:
        raise CnnbalError(f"--max-total-drop: must be >= 0 points, got {max_total_drop}")
    check_outputs(
        {"-o": output},
        {"VAL": val, "--labels": labels, "--classes": classes},
        suffixes={"-o": (".npz",)},
    )
    start = time.perf_counter()
    outputs = read_outputs(val, read_options(logits, labels, prob_prefix, classes))
    params = FitParams(r_low, r_high, beta, alpha)
    artifact, notes = fit_outputs(outputs, method, params)
    check = check_fit(
        outputs.probs,
        outputs.labels,
        fit_function(method, params),
        fitted=artifact,
        max_total_drop=max_total_drop,
    )
    artifact = dataclasses.replace(
        artifact, provenance={**artifact.provenance, "fit_check": check.to_dict()}
    )
    refused = not check.passed and not force
    if output is not None and not refused:
        save_artifact(output, artifact)
    seconds = time.perf_counter() - start
    summary = artifact.describe()
    summary.update(
        {
            "input": str(val),
            "output": str(output) if output is not None and not refused else None,
            "seconds": seconds,
            "fit_check": check.to_dict(),
        }
    )
    summary["warnings"] = list(notes)
    err = stderr_console()
    for note in notes:
        err.print(f"[yellow]warning:[/] {note}", highlight=False)
    if as_json:
        print_json(summary)
    else:
        _print_fit(artifact, summary, val, output if not refused else None, seconds)
    if not check.passed:
        verdict = "written anyway (--force)" if force else "nothing written"
        typer.echo(
            f"FAILED: fit check on {val.name}: {check.summary()}; {verdict}. Choose the "
            f"parameters with `cnnbal sweep {val}` (or keep the raw outputs); --force writes "
            "H anyway.",
            err=True,
        )
        if refused:
            raise typer.Exit(1)


def _print_fit(artifact, summary: dict, val: Path, output: Path | None, seconds: float) -> None:
    from cnnbal.report import fit_check_rows

    out = stdout_console()
    acc_min, acc_max = summary["val_accuracy_min"], summary["val_accuracy_max"]
    share = artifact.n_competitive / max(artifact.n_val, 1)
    params = ", ".join(f"{k}={v:g}" for k, v in sorted(artifact.params.items())) or "none"
    out.print(f"[bold]fit[/] {val.name}: {artifact.method} ({params})", highlight=False)
    out.print(
        f"  samples {artifact.n_val:,}, classes {artifact.n_classes}, "
        f"competitive {artifact.n_competitive:,} ({100 * share:.1f}%)",
        highlight=False,
    )
    out.print(
        f"  per-class val accuracy {_pct(acc_min)} .. {_pct(acc_max)}; "
        f"|H - [I 0]| = {summary['h_distance_from_identity']:.3f}; {1000 * seconds:.0f} ms",
        highlight=False,
    )
    for label, text in fit_check_rows(summary["fit_check"]):
        out.print(f"  {label}: {text}", highlight=False, soft_wrap=True)
    if output is not None:
        out.print(f"  wrote {output}", highlight=False)


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
        f"apply: {report.n_rows:,} rows, {report.n_corrected:,} below the gate, "
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
app.command("extract")(extract_command)


def main() -> None:
    """Console-script entry point."""
    app()
