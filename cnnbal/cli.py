"""The ``cnnbal`` command line: a thin layer over :mod:`cnnbal.pipeline`.

Exit codes: 0 success; 1 an ``evaluate`` check failed (``--min-gain``,
``--max-drop`` and their shorthands); 2 bad input or usage (one line on
stderr, and ``{"error": ..., "exit_code": 2}`` on stdout with ``--json``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from cnnbal import __version__
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
    plain_flags_in_help,
    print_json,
    read_options,
    report_renormalized,
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
    "(Choi 2017's affine correction H after the softmax, per-class logit biases and "
    "calibration; `cnnbal compare` recommends one).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    # Plain help and usage errors (as click, sqlite-utils): typer's rich help
    # imports rich.markdown, markdown_it and pygments, about as long as numpy
    # itself, on every --help and every usage error (benchmarks/bench_startup.py).
    rich_markup_mode=None,
)
plain_flags_in_help()


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


#: The fit check (k-fold CV of the paper's fit) holds VAL in memory: up to this many
#: values (rows x classes, 200 MB of float32). Larger datasets are fitted streaming and
#: the check is skipped with a warning.
FIT_CHECK_MAX_CELLS = 50_000_000

# ---- where the shards run (fit / apply / evaluate)
InputsArg = Annotated[
    list[str],
    typer.Argument(
        help="A file, a folder of shards, a quoted glob ('shards/*.parquet') or several of "
        "these; URIs (file://, s3://, gs://, hdfs://) too.",
        show_default=False,
        metavar="INPUT",
    ),
]
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        help="local (processes on this machine) or dask (a Dask cluster; pip install "
        "'cnnbal[dask]').",
        metavar="NAME",
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
        metavar="N",
    ),
]
ApplyJobsOpt = Annotated[
    int | None,
    typer.Option(
        "--jobs",
        "-j",
        help="Shards corrected in parallel processes (default: half the cores, at least 1; "
        "1 = this process, which already keeps two cores busy: one reading and writing, one "
        "correcting). With --engine dask: workers of the LocalCluster.",
        min=1,
        metavar="N",
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
            metavar="VAL",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Write the correction artifact here (.npz). Without it nothing is written "
            "(a dry run that prints the summary).",
            metavar="FILE",
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="elaborated (the paper's default), naive, logit-adjust, class-balanced-ce, "
            "class-dro, prior-match, worst20-ascent, temperature or vector-scaling "
            "(README: Choosing a correction).",
            metavar="NAME",
        ),
    ] = "elaborated",
    r_low: Annotated[
        float | None,
        typer.Option(
            "--r-low",
            help="elaborated: competitive if true-class prob above this [0.1].",
            metavar="X",
        ),
    ] = None,
    r_high: Annotated[
        float | None,
        typer.Option(
            "--r-high",
            help="elaborated: competitive if max prob below this; the apply gate [0.8].",
            metavar="X",
        ),
    ] = None,
    beta: Annotated[
        float | None,
        typer.Option(
            "--beta", help="elaborated: weight exponent acc_k ** -beta [1.5].", metavar="X"
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option("--alpha", help="elaborated: identity padding strength [3].", metavar="X"),
    ] = None,
    tau: Annotated[
        float | None,
        typer.Option("--tau", help="logit-adjust: b = -tau log prior [by CV].", metavar="X"),
    ] = None,
    l2: Annotated[
        float | None,
        typer.Option(
            "--l2", help="class-balanced-ce: L2 weight shrinking b toward 0 [by CV].", metavar="X"
        ),
    ] = None,
    eta: Annotated[
        float | None,
        typer.Option(
            "--eta", help="class-dro: soft-max temperature over classes [by CV].", metavar="X"
        ),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature", help="prior-match: softmax temperature T [by CV].", metavar="X"
        ),
    ] = None,
    shrink: Annotated[
        float | None,
        typer.Option(
            "--shrink", help="worst20-ascent: b <- shrink * b, in [0, 1] [by CV].", metavar="X"
        ),
    ] = None,
    prior: Annotated[
        str,
        typer.Option(
            "--prior",
            help="prior-match's target: uniform, val (label frequencies) or a FILE of K "
            "weights (.npy or text).",
            metavar="uniform|val|FILE",
        ),
    ] = "uniform",
    unlabelled: Annotated[
        bool,
        typer.Option("--unlabelled", help="prior-match: fit without labels (e.g. on TEST itself)."),
    ] = False,
    folds: Annotated[
        int,
        typer.Option(
            "--folds", help="CV folds (choosing hyper-parameters, the fit check).", metavar="N"
        ),
    ] = 5,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the CV fold assignment.", metavar="N")
    ] = 0,
    objective: Annotated[
        Objective,
        typer.Option(
            "--objective",
            help="What CV maximises (as in sweep).",
            metavar="worst20|low20_val|balanced|total",
        ),
    ] = Objective.worst20,
    max_total_drop: Annotated[
        float,
        typer.Option(
            "--max-total-drop",
            help="The fit check: refuse (exit 1, write nothing) if the cross-validated total "
            "accuracy of the fit falls more than PTS points below raw; CV only chooses "
            "hyper-parameter values within this limit (as in sweep).",
            metavar="PTS",
        ),
    ] = 0.5,
    force: Annotated[
        bool,
        typer.Option("--force", help="Write the correction even if the fit check fails."),
    ] = False,
    logits: LogitsOpt = False,
    renormalize: RenormalizeOpt = False,
    labels: LabelsOpt = None,
    label_column: LabelColumnOpt = None,
    score_column: ScoreColumnOpt = None,
    prob_prefix: PrefixOpt = None,
    delimiter: DelimiterOpt = None,
    classes: ClassesOpt = None,
    engine: EngineOpt = "local",
    jobs: JobsOpt = None,
    scheduler: SchedulerOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit a correction on validation outputs (the paper's H by default; docs/method.md).

    The elaborated and naive fits stream every shard of a dataset; the other
    methods read its rows into memory.

    Hyper-parameters not given are chosen by stratified k-fold cross-validation
    on VAL, with sweep's objective and total-accuracy limit; the output says
    which value CV chose and its CV score.
    """
    from cnnbal.errors import CnnbalError
    from cnnbal.io import check_not_input, check_outputs
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
    check_outputs(
        {"-o": output},
        {
            "--labels": labels,
            "--classes": classes,
            "--prior": None if prior in ("uniform", "val") else Path(prior),
        },
        suffixes={"-o": (".npz",)},
    )
    start = time.perf_counter()
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
    dataset = _open_inputs(val, options, require_labels=not unlabelled)
    if output is not None:
        check_not_input(output, *_local_files(dataset))
    fitted = check = None
    if method in ("elaborated", "naive"):
        from cnnbal.core import DEFAULT_PARAMS, FitParams
        from cnnbal.pipeline import check_params, fit_dataset

        chosen = {name: value for name, value in paper.items() if value is not None}
        params = FitParams(**{**DEFAULT_PARAMS.as_dict(), **chosen})
        check_params(params)
        read_report: dict = {}
        with _engine(engine, jobs, scheduler) as runner:
            artifact, notes = fit_dataset(
                dataset, method=method, params=params, engine=runner, report=read_report
            )
        n_renormalized = read_report.get("rows_renormalized", 0)
        if artifact.n_val * artifact.n_classes <= FIT_CHECK_MAX_CELLS:
            outputs = _read_whole(dataset, require_labels=True)
            check = _fit_check(outputs, method, params, artifact, folds, seed, max_total_drop)
            artifact = dataclasses.replace(
                artifact, provenance={**artifact.provenance, "fit_check": check.to_dict()}
            )
        else:
            stderr_console(quiet).print(
                f"[yellow]warning:[/] fit check skipped: {artifact.n_val:,} rows x "
                f"{artifact.n_classes} classes is more than the check holds in memory "
                f"({FIT_CHECK_MAX_CELLS:,} values); evaluate H on held-out data "
                "(cnnbal evaluate --max-total-drop) before using it",
                highlight=False,
                soft_wrap=True,
            )
    else:
        from cnnbal.pipeline import dataset_sha256, fit_method_outputs, read_prior

        outputs = _read_whole(dataset, require_labels=not unlabelled)
        n_renormalized = outputs.n_renormalized
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
            input_sha256=dataset_sha256(dataset),
            input_name=dataset.label,
        )
        notes = fitted.warnings
        check = _method_check(outputs, fitted, target, unlabelled, folds, seed, max_total_drop)
        artifact = dataclasses.replace(
            artifact, provenance={**artifact.provenance, "fit_check": check.to_dict()}
        )
    report_renormalized(n_renormalized, dataset.label, quiet)
    refused = check is not None and not check.passed and not force
    if output is not None and not refused:
        from cnnbal.artifact import save_artifact

        save_artifact(output, artifact)
    written = output if not refused else None
    _report_fit(
        artifact,
        notes,
        fitted,
        dataset,
        n_renormalized,
        written,
        val,
        start,
        as_json,
        quiet,
        check,
        refused,
    )
    title = _input_title(dataset)
    if refused:
        # one line, whatever --quiet says: a refused fit must never pass unnoticed
        typer.echo(
            f"FAILED: fit check on {title}: {check.summary()}; nothing written. "
            f"{_refused_advice(method, fitted, ' '.join(val))}",
            err=True,
        )
        raise typer.Exit(1)
    if check is not None and not check.passed:  # --force: a warning (quiet hides it)
        stderr_console(quiet).print(
            f"[yellow]warning:[/] fit check failed on {title}: {check.summary()}; "
            "written anyway (--force)",
            highlight=False,
            soft_wrap=True,
        )


def _read_whole(dataset, *, require_labels: bool):
    """Every row of a dataset in memory, for the fits that are not sums over rows.

    One local file is read as before; several shards are streamed chunk by
    chunk (validated as always) and concatenated.
    """
    import numpy as np

    from cnnbal.io import Outputs, read_outputs

    if dataset.is_single_file and dataset.shards[0].filesystem is None:
        return read_outputs(
            dataset.shards[0].location, dataset.options, require_labels=require_labels
        )
    probs, labels, n_renormalized = [], [], 0
    for shard in dataset.shards:
        for chunk in shard.open(dataset.options, require_labels=require_labels).chunks:
            probs.append(np.asarray(chunk.probs))
            labels.append(chunk.labels)
            n_renormalized += chunk.n_renormalized
    return Outputs(
        probs=np.ascontiguousarray(np.concatenate(probs)),
        labels=np.concatenate(labels) if require_labels else None,
        class_names=dataset.class_names,
        path=Path(dataset.label),
        n_renormalized=n_renormalized,
    )


def _fit_check(outputs, method, params, artifact, folds, seed, max_total_drop):
    """The paper's fit (elaborated or naive), cross-validated on VAL."""
    from cnnbal.check import check_fit, fit_function

    return check_fit(
        outputs.probs,
        outputs.labels,
        fit_function(method, params),
        fitted=artifact,
        n_folds=folds,
        seed=seed,
        max_total_drop=max_total_drop,
    )


def _method_check(outputs, fitted, prior, unlabelled, folds, seed, max_total_drop):
    """The check of a method of cnnbal.methods: its own CV's estimate where that CV chose the
    hyper-parameter (and so already kept the limit), else cross-validation of the fit as made
    (hyper-parameters given, or none to choose), refitting it with the same values."""
    import numpy as np

    from cnnbal.check import FitCheck, check_fit, check_from_cv, fit_function

    if unlabelled:
        return FitCheck(
            in_sample={},
            cross_validated={},
            fold_total=np.empty((0, 2)),
            n_folds=folds,
            seed=seed,
            max_total_drop=max_total_drop,
            passed=True,
            skipped="fitted without labels (--unlabelled): no check is possible",
        )
    if fitted.chosen_by_cv:
        return check_from_cv(outputs.probs, outputs.labels, fitted)
    return check_fit(
        outputs.probs,
        outputs.labels,
        fit_function(fitted.method, hyper=fitted.hyper, prior=prior),
        fitted=fitted.correction,
        n_folds=folds,
        seed=seed,
        max_total_drop=max_total_drop,
    )


def _refused_advice(method, fitted, val) -> str:
    """What to do instead of a fit the check refused (one sentence, ends with --force)."""
    if fitted is None:  # elaborated / naive
        return (
            f"Choose the parameters with `cnnbal sweep {val}` (or keep the raw outputs); "
            "--force writes H anyway."
        )
    from cnnbal.methods import HYPERPARAMS

    given = [f"--{name}" for name in fitted.hyper if name in HYPERPARAMS[method]]
    if given:
        return (
            f"Leave {' and '.join(given)} out so that CV chooses within the limit (or keep the "
            "raw outputs); --force writes it anyway."
        )
    return "Keep the raw outputs or try another --method; --force writes it anyway."


def _report_fit(
    artifact,
    notes,
    fitted,
    dataset,
    n_renormalized,
    output,
    val,
    start,
    as_json,
    quiet,
    check=None,
    refused=False,
) -> None:
    seconds = time.perf_counter() - start
    summary = artifact.describe()
    summary.update(
        {
            "input": val[0] if len(val) == 1 else val,
            "shards": len(dataset.shards),
            "output": str(output) if output else None,
            "written": output is not None,
            "rows_renormalized": n_renormalized,
            "seconds": seconds,
        }
    )
    if check is not None:
        summary["fit_check"] = check.to_dict()
    summary["warnings"] = list(notes)
    if fitted is not None:
        summary.update({"hyper": fitted.hyper, "chosen_by_cv": fitted.chosen_by_cv})
        summary["cv"] = fitted.cv
    err = stderr_console(quiet)
    for note in notes:
        err.print(f"[yellow]warning:[/] {note}", highlight=False)
    if output is None and not refused:  # a refused fit says so itself
        err.print(
            "note: nothing written (no -o/--output); pass -o H.npz to save H", highlight=False
        )
    if as_json:
        print_json(summary)
        return
    out = stdout_console(quiet)
    acc_min, acc_max = summary["val_accuracy_min"], summary["val_accuracy_max"]
    params = ", ".join(f"{k}={v:g}" for k, v in sorted(artifact.params.items()))
    params = params or "no hyper-parameters"
    out.print(
        f"[bold]fit[/] {_input_title(dataset)}: {artifact.method} -> {artifact.kind} ({params})",
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
    if check is not None:
        from cnnbal.report import fit_check_rows

        for label, text in fit_check_rows(check.to_dict()):
            out.print(f"  {label}: {text}", highlight=False, soft_wrap=True)
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
    # readable=False: an unreadable H gets load_artifact's one-line error, not click's usage text
    h: Annotated[
        Path,
        typer.Argument(help="The H artifact from `cnnbal fit`.", metavar="H", readable=False),
    ],
    inputs: InputsArg,
    output: Annotated[
        str,
        typer.Option(
            "-o",
            "--output",
            help="A file (one input file; same family: table or array), or a folder for a "
            "dataset: each shard is written under the same relative name.",
            metavar="FILE",
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
        typer.Option(
            "--pred-column",
            help="Name of the prediction column added to the output.",
            metavar="NAME",
        ),
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
    jobs: ApplyJobsOpt = None,
    scheduler: SchedulerOpt = None,
    logits: LogitsOpt = False,
    renormalize: RenormalizeOpt = False,
    labels: LabelsOpt = None,
    label_column: LabelColumnOpt = None,
    score_column: ScoreColumnOpt = None,
    prob_prefix: PrefixOpt = None,
    delimiter: DelimiterOpt = None,
    classes: ClassesOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Correct outputs with H, streaming; writes OUTPUT atomically (a folder for a dataset).

    Tables keep every other column and gain pred (and pred_name when class
    names are known); .npz keeps its other arrays.
    """
    from cnnbal.errors import CnnbalError
    from cnnbal.pipeline import apply_dataset, apply_file

    start = time.perf_counter()
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
    if show_progress() and not as_json and not quiet:
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
        report_renormalized(report.n_renormalized, shard.name, quiet)
        payload = {
            "input": inputs[0],
            "output": str(report.output),
            "rows": report.n_rows,
            "corrected": report.n_corrected,
            "changed_predictions": report.n_changed,
            "rows_renormalized": report.n_renormalized,
            "seconds": seconds,
        }
        if as_json:
            print_json(payload)
            return
        stderr_console(quiet).print(
            f"apply: {report.n_rows:,} rows, {report.n_corrected:,} touched by the correction, "
            f"{report.n_changed:,} predictions changed; wrote {report.output} "
            f"in {seconds:.2f} s",
            highlight=False,
        )
        return
    n_shards = len(dataset.shards)
    if jobs is None and engine == "local":
        from cnnbal.engine import default_apply_jobs

        jobs = default_apply_jobs()
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
                done = {"shards": 0, "skipped_rows": 0, "rows": 0}

                def refresh():
                    bar.update(
                        task,
                        completed=done["skipped_rows"] + done["rows"],
                        shards=f"{done['shards']}/{n_shards}",
                    )

                def advance(index, shard_report):
                    done["shards"] += 1
                    if shard_report.skipped:  # done by an earlier run
                        done["skipped_rows"] += dataset.shards[index].n_rows or 0
                    refresh()

                def rows(n):  # after each block in one process, each shard in several
                    done["rows"] = n
                    refresh()

                report = apply_dataset(h, dataset, output, on_shard=advance, on_rows=rows, **kwargs)
        else:
            report = apply_dataset(h, dataset, output, **kwargs)
    seconds = time.perf_counter() - start
    report_renormalized(report.n_renormalized, dataset.label, quiet)
    payload = {
        "input": inputs if len(inputs) > 1 else inputs[0],
        "output": str(report.output_dir),
        "shards": n_shards,
        "skipped": report.n_skipped,
        "rows": report.n_rows,
        "corrected": report.n_corrected,
        "changed_predictions": report.n_changed,
        "engine": engine,
        "rows_renormalized": report.n_renormalized,
        "seconds": seconds,
    }
    if as_json:
        print_json(payload)
        return
    skipped = f" ({report.n_skipped} already done, skipped)" if report.n_skipped else ""
    stderr_console(quiet).print(
        f"apply: {n_shards} shards{skipped}, {report.n_rows:,} rows, "
        f"{report.n_corrected:,} touched by the correction, "
        f"{report.n_changed:,} predictions changed; wrote {report.output_dir}/ in {seconds:.2f} s",
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
            metavar="TEST",
        ),
    ],
    h: Annotated[
        Path | None,
        typer.Option(
            "-H",
            "--correction",
            help="The H artifact (omit: raw only). Its class names read string labels.",
            metavar="FILE",
            readable=False,  # load_artifact says what is wrong, in one line
        ),
    ] = None,
    h_old_spelling: Annotated[
        Path | None, typer.Option("--h", hidden=True, metavar="FILE", readable=False)
    ] = None,
    per_class: Annotated[
        bool, typer.Option("--per-class", help="Also show per-class accuracy.")
    ] = False,
    min_gain: Annotated[
        list[str] | None,
        typer.Option(
            "--min-gain",
            help="Exit 1 unless METRIC (any key of the JSON 'metrics', e.g. "
            "worst20_accuracy) improves by at least PTS points (hundredths of the metric: "
            "percentage points for accuracies; for squared_error a gain is a decrease). "
            "Repeatable.",
            metavar="METRIC=PTS",
        ),
    ] = None,
    max_drop: Annotated[
        list[str] | None,
        typer.Option(
            "--max-drop",
            help="Exit 1 if METRIC worsens by more than PTS points (as --min-gain). Repeatable.",
            metavar="METRIC=PTS",
        ),
    ] = None,
    max_total_drop: Annotated[
        float | None,
        typer.Option(
            "--max-total-drop",
            help="Shorthand for --max-drop total_accuracy=PTS.",
            metavar="PTS",
        ),
    ] = None,
    min_low20_gain: Annotated[
        float | None,
        typer.Option(
            "--min-low20-gain",
            help="Shorthand for --min-gain low20_accuracy=PTS: the paper's low-20%, biased "
            "upward (prefer --min-gain worst20_accuracy=PTS).",
            metavar="PTS",
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
    engine: EngineOpt = "local",
    jobs: JobsOpt = None,
    scheduler: SchedulerOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare raw and corrected metrics over all rows, streaming; CI checks with exit code 1."""
    from cnnbal.artifact import load_artifact
    from cnnbal.errors import CnnbalError
    from cnnbal.pipeline import evaluate_dataset, with_names_from
    from cnnbal.report import (
        COMPARISON_NOTE,
        comparison_payload,
        comparison_table,
        per_class_table,
    )

    if h is None:
        h = h_old_spelling
    elif h_old_spelling is not None:
        raise CnnbalError("-H/--correction given twice (also as --h)")
    gates = parse_gates(min_gain or [], max_drop or [], max_total_drop, min_low20_gain)
    if gates and h is None:
        flags = ", ".join(sorted({g.flag for g in gates}))
        raise CnnbalError(
            f"{flags} needs -H H.npz: without a correction there is no change to check"
        )
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
    artifact = load_artifact(h) if h is not None else None
    if artifact is not None:  # string labels are read through H's class names
        options = with_names_from(options, artifact)
    dataset = _open_inputs(test, options, require_labels=True)
    read_report: dict = {}
    with _engine(engine, jobs, scheduler) as runner:
        comparison = evaluate_dataset(
            dataset,
            artifact,
            engine=runner,
            h_name=h.name if h is not None else "H",
            report=read_report,
        )
    n_renormalized = read_report.get("rows_renormalized", 0)
    report_renormalized(n_renormalized, dataset.label, quiet)
    names = dataset.class_names or (artifact.class_names if artifact else None)
    checks = [gate.check(comparison) for gate in gates]
    if as_json:
        payload = comparison_payload(comparison, names)
        payload.update(
            {
                "input": test[0] if len(test) == 1 else test,
                "shards": len(dataset.shards),
                "h": str(h) if h else None,
                "rows_renormalized": n_renormalized,
                "checks": checks,
                "passed": all(c["passed"] for c in checks),
            }
        )
        print_json(payload)
    else:
        out = stdout_console(quiet)
        title = (
            f"{_input_title(dataset)}: {comparison.n_samples:,} samples, "
            f"{dataset.n_classes} classes"
        )
        if h is None:
            title += " (no H: raw only)"
        out.print(comparison_table(comparison, title=title, raw_only=h is None))
        out.print(COMPARISON_NOTE, highlight=False)
        if per_class:
            out.print(per_class_table(comparison, names, artifact, raw_only=h is None))
    failed = [c for c in checks if not c["passed"]]
    err = stderr_console(quiet)
    for check in checks:
        if check["passed"]:
            err.print(f"[green]ok[/]: {check['message']}", highlight=False)
        else:  # a failed check is shown even with --quiet, like an error
            stderr_console().print(f"[bold red]FAILED[/]: {check['message']}", highlight=False)
    if failed:
        raise typer.Exit(1)


class Gate:
    """One CI check of ``evaluate``: a metric must gain at least, or drop at most, PTS points.

    Points are hundredths of the metric (percentage points for accuracies).
    For a metric where lower is better (``squared_error``) a gain is a
    decrease.
    """

    def __init__(self, kind: str, metric: str, pts: float, flag: str):
        self.kind, self.metric, self.pts, self.flag = kind, metric, pts, flag

    def check(self, comparison) -> dict:
        from cnnbal.report import LOWER_IS_BETTER

        raw, new = comparison.metrics[self.metric]
        change = 100 * (new - raw)
        gain = -change if self.metric in LOWER_IS_BETTER else change
        if change != change:
            passed = False
            moved = "is not defined on this file"
        else:
            limit = self.pts if self.kind == "min_gain" else -self.pts
            passed = gain >= limit - 1e-9
            verb = "rose" if change > 0 else "fell"
            moved = "did not change" if abs(change) < 5e-3 else f"{verb} {abs(change):.2f} pts"
            if self.metric in LOWER_IS_BETTER and abs(change) >= 5e-3:
                moved += " (lower is better)"
        if self.kind == "min_gain":
            rule = f"required: a gain of at least {self.pts:g} pts"
        else:
            rule = f"allowed: a drop of at most {self.pts:g} pts"
        return {
            "name": self.kind,
            "flag": self.flag,
            "metric": self.metric,
            "limit_pts": self.pts,
            "change_pts": change,
            "gain_pts": gain,
            "passed": passed,
            "message": f"{self.metric} {moved}; {rule} ({self.flag})",
        }


def parse_gates(
    min_gain: list[str],
    max_drop: list[str],
    max_total_drop: float | None,
    min_low20_gain: float | None,
) -> list[Gate]:
    """The CI checks asked for, in command-line order by kind (shorthands last)."""
    from cnnbal.errors import CnnbalError

    gates = [_parse_gate("min_gain", "--min-gain", text) for text in min_gain]
    gates += [_parse_gate("max_drop", "--max-drop", text) for text in max_drop]
    if max_total_drop is not None:
        gates.append(Gate("max_drop", "total_accuracy", max_total_drop, "--max-total-drop"))
    if min_low20_gain is not None:
        gates.append(Gate("min_gain", "low20_accuracy", min_low20_gain, "--min-low20-gain"))
    for gate in gates:
        if gate.pts != gate.pts or gate.pts in (float("inf"), float("-inf")):
            raise CnnbalError(f"{gate.flag}: PTS must be a finite number, got {gate.pts}")
    return gates


def _parse_gate(kind: str, flag: str, text: str) -> Gate:
    from cnnbal.errors import CnnbalError
    from cnnbal.metrics import METRIC_NAMES

    metric, sep, value = text.partition("=")
    metric = metric.strip()
    try:
        pts = float(value) if sep else float("nan")
    except ValueError:
        pts = float("nan")
    if not sep or pts != pts:
        raise CnnbalError(f"{flag}: expected METRIC=PTS (e.g. worst20_accuracy=0.5), got {text!r}")
    if metric not in METRIC_NAMES and f"{metric}_accuracy" in METRIC_NAMES:
        metric = f"{metric}_accuracy"  # worst20=0.5 is worst20_accuracy=0.5
    if metric not in METRIC_NAMES:
        raise CnnbalError(f"{flag}: unknown metric {metric!r}; one of {', '.join(METRIC_NAMES)}")
    return Gate(kind, metric, pts, flag)


# ------------------------------------------------------------------ info


@app.command("info")
@handle_errors
def info_command(
    h: Annotated[Path, typer.Argument(help="An H artifact.", metavar="H", readable=False)],
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Describe an H artifact: method, parameters, validation accuracy, origin, provenance."""
    from cnnbal.artifact import load_artifact

    artifact = load_artifact(h)
    summary = artifact.describe()
    if as_json:
        print_json(summary)
        return
    from cnnbal.report import info_sections

    out = stdout_console(quiet)
    for section in info_sections(summary, artifact, title=str(h)):
        out.print(section)


app.command("sweep")(sweep_command)
app.command("compare")(compare_command)
app.command("extract")(extract_command)


def main() -> None:
    """Console-script entry point."""
    import sys

    if "--json" in sys.argv[1:]:
        sys.exit(_main_json())
    app()


def _main_json() -> int:
    """Run with ``--json`` given: a usage error (a bad flag value, a missing argument) is
    bad input too, so it is also printed on stdout as ``{"error": ..., "exit_code": 2}``."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        return 1
    except Exception as exc:
        # click's ClickException (typer >= 0.29 vendors click: match it by its shape)
        if not (
            hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)
        ):
            raise
        try:
            from typer import rich_utils

            rich_utils.rich_format_error(exc)  # the usual message on stderr
        except Exception:  # another typer: click's own format
            exc.show()
        print_json({"error": exc.format_message(), "exit_code": exc.exit_code})
        return exc.exit_code
    return code if isinstance(code, int) else 0
