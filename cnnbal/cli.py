"""The ``cnnbal`` command line: a thin layer over :mod:`cnnbal.pipeline`.

Exit codes: 0 success; 1 an ``evaluate`` check failed (``--max-total-drop``,
``--min-low20-gain``); 2 bad input or usage (one line on stderr).
"""

from __future__ import annotations

import os
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


# ---- where the shards run (fit / apply / evaluate)
InputsArg = Annotated[
    list[str],
    typer.Argument(
        help="A file, a folder of shards, a quoted glob ('shards/*.parquet') or several of "
        "these; URIs (file://, s3://, gs://, hdfs://) too.",
        show_default=False,
    ),
]
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        help="local (processes on this machine) or dask (a Dask cluster; pip install "
        "'cnnbal[dask]').",
    ),
]
JobsOpt = Annotated[
    int | None,
    typer.Option(
        "--jobs",
        "-j",
        help="Shards processed in parallel (default: the number of cores; 1 = this process). "
        "With --engine dask: workers of the LocalCluster.",
        min=1,
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="--engine dask: address of a running scheduler (default: $DASK_SCHEDULER_ADDRESS, "
        "else a LocalCluster for this run).",
        metavar="ADDRESS",
    ),
]


def _open_inputs(inputs: list[str], options, *, require_labels: bool):
    from cnnbal.io import open_dataset

    return open_dataset(inputs, options, require_labels=require_labels)


def _engine(engine: str, jobs: int | None, scheduler: str | None):
    from cnnbal.engine import make_engine

    return make_engine(engine, jobs=jobs, scheduler=scheduler)


def _local_files(dataset) -> list[str]:
    """The shards on this machine (outputs must never replace one of them)."""
    return [s.location for s in dataset.shards if s.filesystem is None]


def _input_title(dataset) -> str:
    """A file's name, or the dataset's label with its shard count."""
    if dataset.is_single_file:
        return Path(dataset.shards[0].location).name
    return dataset.label


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
    val: Annotated[
        list[str],
        typer.Argument(
            help="Validation outputs with labels: a file, a folder of shards, a quoted glob or "
            "several of these (URIs too).",
            show_default=False,
        ),
    ],
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
    logits: LogitsOpt = False,
    labels: LabelsOpt = None,
    prob_prefix: PrefixOpt = None,
    classes: ClassesOpt = None,
    engine: EngineOpt = "local",
    jobs: JobsOpt = None,
    scheduler: SchedulerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fit the correction H on validation outputs (docs/method.md 1-2), streaming."""
    from cnnbal.artifact import save_artifact
    from cnnbal.core import METHODS, FitParams
    from cnnbal.errors import CnnbalError
    from cnnbal.io import check_not_input
    from cnnbal.pipeline import check_params, fit_dataset

    if method not in METHODS:
        raise CnnbalError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    params = FitParams(r_low, r_high, beta, alpha)
    check_params(params)
    start = time.perf_counter()
    dataset = _open_inputs(
        val, read_options(logits, labels, prob_prefix, classes), require_labels=True
    )
    if output is not None:
        check_not_input(output, *_local_files(dataset))
    with _engine(engine, jobs, scheduler) as runner:
        artifact, notes = fit_dataset(dataset, method=method, params=params, engine=runner)
    if output is not None:
        save_artifact(output, artifact)
    seconds = time.perf_counter() - start
    summary = artifact.describe()
    summary.update(
        {
            "input": val[0] if len(val) == 1 else val,
            "shards": len(dataset.shards),
            "output": str(output) if output else None,
            "seconds": seconds,
        }
    )
    summary["warnings"] = list(notes)
    err = stderr_console()
    for note in notes:
        err.print(f"[yellow]warning:[/] {note}", highlight=False)
    if as_json:
        print_json(summary)
        return
    out = stdout_console()
    acc_min, acc_max = summary["val_accuracy_min"], summary["val_accuracy_max"]
    share = artifact.n_competitive / max(artifact.n_val, 1)
    params = ", ".join(f"{k}={v:g}" for k, v in sorted(artifact.params.items())) or "none"
    out.print(
        f"[bold]fit[/] {_input_title(dataset)}: {artifact.method} ({params})", highlight=False
    )
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
    if output is not None:
        out.print(f"  wrote {output}", highlight=False)


# ------------------------------------------------------------------ apply


@app.command("apply")
@handle_errors
def apply_command(
    h: Annotated[Path, typer.Argument(help="The H artifact from `cnnbal fit`.")],
    inputs: InputsArg,
    output: Annotated[
        str,
        typer.Option(
            "-o",
            "--output",
            help="A file (one input file; same family: table or array), or a folder for a "
            "dataset: each shard is written under the same relative name.",
        ),
    ],
    raw_scores: Annotated[
        bool,
        typer.Option(
            "--raw-scores", help="Keep the affine scores (may be < 0) instead of renormalising."
        ),
    ] = False,
    pred_column: Annotated[
        str,
        typer.Option("--pred-column", help="Name of the prediction column added to the output."),
    ] = "pred",
    force: Annotated[
        bool,
        typer.Option("--force", help="Correct inputs that already record an applied H."),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Dataset: redo shards whose output exists (default: skip those written with "
            "the same H, refuse the others).",
        ),
    ] = False,
    engine: EngineOpt = "local",
    jobs: JobsOpt = None,
    scheduler: SchedulerOpt = None,
    logits: LogitsOpt = False,
    labels: LabelsOpt = None,
    prob_prefix: PrefixOpt = None,
    classes: ClassesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Correct outputs with H, streaming; writes OUTPUT atomically (a folder for a dataset)."""
    from cnnbal.errors import CnnbalError
    from cnnbal.pipeline import apply_dataset, apply_file

    start = time.perf_counter()
    options = read_options(logits, labels, prob_prefix, classes)
    if not pred_column:
        raise CnnbalError("--pred-column must not be empty")
    dataset = _open_inputs(inputs, options, require_labels=False)
    single = (
        len(inputs) == 1
        and dataset.is_single_file
        and not Path(dataset.shards[0].location).is_dir()
        and not _names_folder(output)
        and not _is_pattern_or_folder(inputs[0])
    )
    output = Path(output)
    bar = None
    if show_progress() and not as_json:
        bar = _progress_bar(single)
    if single:
        shard = dataset.shards[0]
        kwargs = dict(
            options=options,
            raw_scores=raw_scores,
            pred_column=pred_column,
            force=force,
            filesystem=shard.filesystem,
        )
        if bar is not None and engine == "local":
            with bar:
                task = bar.add_task("apply", total=shard.n_rows, shards="")
                report = apply_file(
                    h,
                    shard.location,
                    output,
                    progress=lambda n: bar.update(task, completed=n),
                    **kwargs,
                )
        elif engine == "local":
            report = apply_file(h, shard.location, output, **kwargs)
        else:
            with _engine(engine, jobs, scheduler) as runner:
                report = apply_file(h, shard.location, output, engine=runner, **kwargs)
        seconds = time.perf_counter() - start
        payload = {
            "input": inputs[0],
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
        return
    n_shards = len(dataset.shards)
    with _engine(engine, jobs, scheduler) as runner:
        kwargs = dict(
            raw_scores=raw_scores,
            pred_column=pred_column,
            force=force,
            overwrite=overwrite,
            engine=runner,
        )
        if bar is not None:
            with bar:
                task = bar.add_task("apply", total=dataset.n_rows, shards=f"0/{n_shards}")
                done = {"shards": 0, "rows": 0}

                def advance(index, shard_report):
                    done["shards"] += 1
                    rows = shard_report.n_rows or (dataset.shards[index].n_rows or 0)
                    done["rows"] += rows
                    bar.update(task, completed=done["rows"], shards=f"{done['shards']}/{n_shards}")

                report = apply_dataset(h, dataset, output, on_shard=advance, **kwargs)
        else:
            report = apply_dataset(h, dataset, output, **kwargs)
    seconds = time.perf_counter() - start
    payload = {
        "input": inputs if len(inputs) > 1 else inputs[0],
        "output": str(report.output_dir),
        "shards": n_shards,
        "skipped": report.n_skipped,
        "rows": report.n_rows,
        "corrected": report.n_corrected,
        "changed_predictions": report.n_changed,
        "engine": engine,
        "seconds": seconds,
    }
    if as_json:
        print_json(payload)
        return
    skipped = f" ({report.n_skipped} already done, skipped)" if report.n_skipped else ""
    stderr_console().print(
        f"apply: {n_shards} shards{skipped}, {report.n_rows:,} rows, "
        f"{report.n_corrected:,} below the gate, {report.n_changed:,} predictions changed; "
        f"wrote {report.output_dir}/ in {seconds:.2f} s",
        highlight=False,
    )


def _names_folder(output: str) -> bool:
    """``-o out/``, or an existing folder not named like an output file."""
    from cnnbal.io import SUFFIXES

    if output.endswith(("/", os.sep)):
        return True
    return Path(output).is_dir() and Path(output).suffix.lower() not in SUFFIXES


def _is_pattern_or_folder(text: str) -> bool:
    import glob

    body = text.split("://", 1)[-1]
    return glob.has_magic(body) or text.endswith("/")


def _progress_bar(single: bool):
    """One bar over rows (and shards) on stderr; transient, so logs keep only the summary."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("apply"), BarColumn()]
    if not single:
        columns.append(TextColumn("{task.fields[shards]} shards"))
    columns += [TextColumn("{task.completed:,} rows"), TimeElapsedColumn()]
    return Progress(*columns, console=stderr_console(), transient=True)


# ------------------------------------------------------------------ evaluate


@app.command("evaluate")
@handle_errors
def evaluate_command(
    test: Annotated[
        list[str],
        typer.Argument(
            help="Labelled outputs to evaluate on: a file, a folder of shards, a quoted glob or "
            "several of these (URIs too); one set of metrics over all rows.",
            show_default=False,
        ),
    ],
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
    engine: EngineOpt = "local",
    jobs: JobsOpt = None,
    scheduler: SchedulerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare raw and corrected metrics over all rows, streaming; CI checks with exit code 1."""
    from cnnbal.artifact import load_artifact
    from cnnbal.pipeline import evaluate_dataset
    from cnnbal.report import comparison_payload, comparison_table, per_class_table

    artifact = load_artifact(h) if h is not None else None
    dataset = _open_inputs(
        test, read_options(logits, labels, prob_prefix, classes), require_labels=True
    )
    with _engine(engine, jobs, scheduler) as runner:
        comparison = evaluate_dataset(
            dataset, artifact, engine=runner, h_name=h.name if h is not None else "H"
        )
    names = dataset.class_names or (artifact.class_names if artifact else None)
    checks = _ci_checks(comparison, max_total_drop, min_low20_gain)
    if as_json:
        payload = comparison_payload(comparison, names)
        payload.update(
            {
                "input": test[0] if len(test) == 1 else test,
                "shards": len(dataset.shards),
                "h": str(h) if h else None,
                "checks": checks,
                "passed": all(c["passed"] for c in checks),
            }
        )
        print_json(payload)
    else:
        out = stdout_console()
        title = (
            f"{_input_title(dataset)}: {comparison.n_samples:,} samples, "
            f"{dataset.n_classes} classes"
        )
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
