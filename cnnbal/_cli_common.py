"""What every cnnbal command shares: reading flags, error handling, consoles.

Kept apart from :mod:`cnnbal.cli` so that command modules (sweep, extract) can
use it without importing each other.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cnnbal.errors import CnnbalError

F = TypeVar("F", bound=Callable[..., Any])

# ---- reading flags, shared by fit / apply / evaluate / sweep
LogitsOpt = Annotated[
    bool, typer.Option("--logits", help="Scores are logits: apply a (stable) softmax.")
]
LabelsOpt = Annotated[
    Path | None,
    typer.Option("--labels", help="Labels for a .npy input: a 1-D integer .npy file."),
]
PrefixOpt = Annotated[
    str | None,
    typer.Option(
        "--prob-prefix",
        help="Table inputs: read columns PREFIX0 .. PREFIX{K-1} (default: a 'probs' list "
        "column, else p_0.., else logit_0..).",
    ),
]
ClassesOpt = Annotated[
    Path | None,
    typer.Option("--classes", help="Class names, one per line (maps string labels)."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")
]


def read_options(logits: bool, labels: Path | None, prob_prefix: str | None, classes: Path | None):
    """Bundle the reading flags into :class:`cnnbal.io.ReadOptions`."""
    from cnnbal.io import ReadOptions

    return ReadOptions(
        logits=logits, labels_path=labels, prob_prefix=prob_prefix, classes_path=classes
    )


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every cleanup on the way out runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


#: Signals handled like SIGINT: the temporary output removed, exit 128 + signal.
CLEANUP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Raise :class:`Signalled` on SIGTERM/SIGHUP for the duration (main thread only).

    A second such signal during the cleanup is ignored, so that the cleanup
    finishes; the previous handlers come back on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        for sig in CLEANUP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Signalled(signum)

    previous = {}
    for sig in CLEANUP_SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            previous[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def handle_errors(func: F) -> F:
    """Turn a :class:`CnnbalError` into one line on stderr and exit code 2.

    Also: an ``OSError`` (the environment: an unwritable folder, a full disk)
    is one line and exit 2; Ctrl-C, SIGTERM and SIGHUP are one line and exit
    128 + the signal number, after every temporary output is removed.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with signals_as_interrupts():
                return func(*args, **kwargs)
        except CnnbalError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # the environment, not a bug: unwritable dir, disk full
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
            typer.echo(f"interrupted{by}", err=True)
            raise typer.Exit(128 + int(signum)) from None

    return wrapper  # type: ignore[return-value]


def stderr_console():
    """A rich console for human messages and tables (stderr when --json owns stdout)."""
    from rich.console import Console

    return Console(stderr=True)


def stdout_console():
    from rich.console import Console

    return Console()


def print_json(payload: dict) -> None:
    """Machine output: one JSON object on stdout (NaN written as null)."""
    sys.stdout.write(json.dumps(_clean(payload), indent=2) + "\n")


def _clean(value):
    if isinstance(value, float):
        return None if value != value or value in (float("inf"), float("-inf")) else value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    return value


def show_progress() -> bool:
    """Progress bars only on an interactive terminal (quiet in pipes and CI logs)."""
    return sys.stderr.isatty()


def parse_floats(text: str, flag: str) -> list[float]:
    """Parse a comma-separated list of numbers for ``flag`` (a CnnbalError if it is not)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CnnbalError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise CnnbalError(f"{flag}: expected at least one number")
    return values
