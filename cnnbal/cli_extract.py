"""``cnnbal extract``: run an image classifier over images and write the probability file.

A thin command over :mod:`cnnbal.extract`; torch is imported only when the
command runs.
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cnnbal._cli_common import QuietOpt, handle_errors, parse_floats, print_json, show_progress
from cnnbal.errors import CnnbalError


class Amp(str, Enum):
    """Mixed precision for the forward pass."""

    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


@handle_errors
def extract_command(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="A TorchScript archive (torch.jit.save), or 'package.module:factory' "
            "(called with no arguments) together with --weights.",
            show_default=False,
        ),
    ],
    data: Annotated[
        Path,
        typer.Argument(
            metavar="DATA",
            help="An image folder with one subfolder per class (labels = sorted folder "
            "names), a flat image folder (no labels), or an .npy/.npz image array "
            "(N,H,W,C uint8 or N,C,H,W float in [0,1]; npz keys 'images', 'labels').",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The .parquet file to write (extract writes parquet only: the class names "
            "live in its metadata).",
            show_default=False,
            metavar="FILE",
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            help="State dict for a factory model, read with torch.load(weights_only=True).",
            metavar="FILE",
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels", help="Labels for .npy images: a 1-D integer .npy file.", metavar="FILE"
        ),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            "--size", help="Resize so the shorter side is N pixels (default: keep).", metavar="N"
        ),
    ] = None,
    crop: Annotated[
        int | None,
        typer.Option("--crop", help="Center-crop to N x N pixels (default: no crop).", metavar="N"),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option(
            "--mean",
            help="Per-channel mean, comma-separated, on the [0,1] scale "
            "(default: ImageNet 0.485,0.456,0.406; their average for --channels 1).",
            metavar="LIST",
        ),
    ] = None,
    std: Annotated[
        str | None,
        typer.Option(
            "--std",
            help="Per-channel std, comma-separated (default: ImageNet 0.229,0.224,0.225; "
            "their average for --channels 1).",
            metavar="LIST",
        ),
    ] = None,
    channels: Annotated[
        int,
        typer.Option("--channels", help="3: convert images to RGB; 1: to grayscale.", metavar="N"),
    ] = 3,
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps.",
            metavar="NAME",
        ),
    ] = "auto",
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Images per forward pass.", metavar="N")
    ] = 64,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Data loader processes decoding images; 0 decodes in-process "
            "(default: 0 on CPU, min(8, CPUs) on CUDA/MPS).",
            show_default=False,
            metavar="N",
        ),
    ] = None,
    amp: Annotated[
        Amp,
        typer.Option(
            "--amp", help="Mixed precision: bf16 (CUDA or CPU) or fp16 (CUDA).", metavar="NAME"
        ),
    ] = Amp.none,
    classes: Annotated[
        Path | None,
        typer.Option(
            "--classes",
            help="The model's class names, one per line, in output order (for flat folders "
            "and arrays; replaces folder names).",
            metavar="FILE",
        ),
    ] = None,
    save_logits: Annotated[
        bool, typer.Option("--save-logits", help="Also write a 'logits' column.")
    ] = False,
    skip_bad: Annotated[
        bool,
        typer.Option("--skip-bad", help="Skip and count unreadable images instead of failing."),
    ] = False,
    tf32: Annotated[
        bool,
        typer.Option(
            "--tf32/--no-tf32",
            help="Let CUDA convolutions and matmuls use TF32: faster on Ampere and later, "
            "probabilities about 1e-4 from the CPU's. Default: IEEE float32.",
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON object on stdout (output, rows, classes, device, amp, "
            "precision, seconds, images_per_second, skipped).",
        ),
    ] = False,
    quiet: QuietOpt = False,
    out_deprecated: Annotated[
        Path | None,
        typer.Option("--out", hidden=True, help="Deprecated spelling of -o/--output."),
    ] = None,
) -> None:
    """Run an image classifier over images and write its softmax outputs to parquet.

    Each image is decoded with Pillow, converted to RGB (or grayscale), resized
    so the shorter side is --size, center-cropped to --crop, scaled to [0, 1]
    and normalised with --mean/--std. The output has columns label (when
    known), probs, logits (with --save-logits) and path, with the class names
    in the file's metadata: the input of `cnnbal fit`, `apply` and `evaluate`.
    """
    if out_deprecated is not None:
        if output is not None:
            raise CnnbalError("--out: deprecated spelling of -o/--output; give only -o")
        if not quiet:
            typer.echo("warning: --out is deprecated; use -o/--output", err=True)
        output = out_deprecated
    if output is None:
        raise CnnbalError("-o/--output: missing; name the .parquet file to write")
    report = _run(
        model=model,
        data=data,
        out=output,
        weights=weights,
        labels=labels,
        classes=classes,
        size=size,
        crop=crop,
        mean=mean,
        std=std,
        channels=channels,
        device=device,
        batch_size=batch_size,
        workers=workers,
        amp=None if amp is Amp.none else amp.value,
        tf32=tf32,
        save_logits=save_logits,
        skip_bad=skip_bad,
        quiet=quiet,
    )
    if not quiet:
        _print_summary(report, output)
    if as_json:
        print_json(report_json(report, amp.value))


def _print_summary(report, output: Path) -> None:
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    skipped = f", skipped {report.n_skipped} unreadable" if report.n_skipped else ""
    typer.echo(
        f"extracted {report.n_images} images{skipped} on {report.device} ({report.precision}) "
        f"in {report.seconds:.1f} s ({report.images_per_second:.0f} images/s) -> {output}",
        err=True,
    )
    for path in report.skipped[:5]:
        typer.echo(f"skipped: {path}", err=True)
    if report.n_skipped > 5:
        typer.echo(f"skipped: ... and {report.n_skipped - 5} more", err=True)


def report_json(report, amp: str) -> dict:
    """The ``--json`` object of a finished run."""
    return {
        "output": report.output,
        "rows": report.n_images,
        "skipped": report.n_skipped,
        "skipped_paths": list(report.skipped),
        "n_classes": report.n_classes,
        "classes": report.class_names,
        "device": report.device,
        "amp": amp,
        "precision": report.precision,
        "batch_size": report.batch_size,
        "workers": report.workers,
        "seconds": report.seconds,
        "setup_seconds": report.setup_seconds,
        "images_per_second": report.images_per_second,
        "notes": list(report.notes),
    }


def _run(
    *, model, data, out, weights, labels, classes, mean, std, size, crop, channels, quiet, **options
):
    from cnnbal import extract as api

    api.require_torch()
    preprocessing = api.Preprocessing(
        size=size,
        crop=crop,
        mean=None if mean is None else tuple(parse_floats(mean, "--mean")),
        std=None if std is None else tuple(parse_floats(std, "--std")),
        channels=channels,
    )
    # every file named on the command line; the output may be none of them
    inputs = (Path(model), weights, labels, classes, data if data.is_file() else None)
    inputs = tuple(path for path in inputs if path is not None)
    inputs = tuple(path for path in inputs if path.exists())
    api.check_output_path(out, None, inputs)
    names = None
    if classes is not None:
        from cnnbal.io import read_class_names

        names = read_class_names(classes)
    source = api.discover(data, labels_path=labels, class_names=names)
    api.check_output_path(out, source, inputs)
    # resolved before loading: a TorchScript archive is loaded straight onto it
    device = api.resolve_device(options.pop("device"))
    loaded = api.load_model(model, weights, device=device)
    run = functools.partial(
        api.extract,
        loaded,
        source,
        out,
        preprocessing=preprocessing,
        device=device,
        inputs=inputs,
        model_name=model,
        **options,
    )
    if quiet or not show_progress():
        return run()
    with _progress_bar(len(source)) as update:
        return run(progress=update)


@contextmanager
def _progress_bar(total: int):
    """A rich progress bar with images per second on stderr; yields the update callback."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.0f} img/s")

    with Progress(
        TextColumn("extract"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    ) as progress:
        task = progress.add_task("extract", total=total)
        yield lambda done, total: progress.update(task, completed=done)
