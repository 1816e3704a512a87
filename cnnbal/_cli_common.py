"""What every cnnbal command shares: reading flags, error handling, consoles.

Kept apart from :mod:`cnnbal.cli` so that command modules (sweep, extract) can
use it without importing each other.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cnnbal.errors import CnnbalError

F = TypeVar("F", bound=Callable[..., Any])

# Metavars: upper case, one word per kind of value, the same on every command
# (FILE, NAME, PTS, N, X, LIST); flags show none.

# ---- reading flags, shared by fit / apply / evaluate / sweep
LogitsOpt = Annotated[
    bool, typer.Option("--logits", help="Scores are logits: apply a (stable) softmax.")
]
RenormalizeOpt = Annotated[
    bool,
    typer.Option(
        "--renormalize",
        help="Divide rows whose sum is off 1 by more than 1e-3 by their sum (rounded "
        "exports, e.g. written with %.4f) instead of refusing them; the count goes to stderr.",
    ),
]
LabelsOpt = Annotated[
    Path | None,
    typer.Option(
        "--labels", help="Labels for a .npy input: a 1-D integer .npy file.", metavar="FILE"
    ),
]
LabelColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--label-column",
        help="The label column of a table (default: label, else labels), or the label "
        "array of an .npz.",
        metavar="NAME",
    ),
]
ScoreColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--score-column",
        help="The scores of a table: a list column NAME, or K columns NAME0 .. NAME{K-1}; "
        "the score array of an .npz (default: probs, else p_0.., else logits / logit_0..).",
        metavar="NAME",
    ),
]
PrefixOpt = Annotated[
    str | None,
    typer.Option(
        "--prob-prefix",
        help="Table inputs: read columns PREFIX0 .. PREFIX{K-1} (--score-column does this "
        "and list columns).",
        metavar="PREFIX",
    ),
]
DelimiterOpt = Annotated[
    str | None,
    typer.Option(
        "--delimiter",
        help="CSV field separator, one character or 'tab' (default: detected from the "
        "header among , ; tab |).",
        metavar="CHAR",
    ),
]
ClassesOpt = Annotated[
    Path | None,
    typer.Option(
        "--classes",
        help="Class names, one per line (maps string labels; default: the file's, else H's).",
        metavar="FILE",
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON object on stdout instead of tables (on bad input: "
        '{"error": ..., "exit_code": 2}).',
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option("-q", "--quiet", help="Print nothing but errors and failed checks (and --json)."),
]


def read_options(
    logits: bool,
    labels: Path | None,
    prob_prefix: str | None,
    classes: Path | None,
    *,
    renormalize: bool = False,
    label_column: str | None = None,
    score_column: str | None = None,
    delimiter: str | None = None,
):
    """Bundle the reading flags into :class:`cnnbal.io.ReadOptions`."""
    from cnnbal.io import ReadOptions

    if prob_prefix is not None and score_column is not None:
        raise CnnbalError("--prob-prefix and --score-column: give one of them")
    return ReadOptions(
        logits=logits,
        labels_path=labels,
        prob_prefix=prob_prefix,
        classes_path=classes,
        renormalize=renormalize,
        label_column=label_column,
        score_column=score_column,
        delimiter=delimiter,
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


def report_renormalized(n_rows: int, source, quiet: bool = False) -> None:
    """One line on stderr when --renormalize changed rows (a count, not a warning per row)."""
    if n_rows:
        stderr_console(quiet).print(
            f"note: {source}: renormalized {n_rows:,} row(s) whose sum was off 1 by more "
            "than 1e-3 (--renormalize)",
            highlight=False,
        )


#: The keyword names under which commands take --json (their JSON mode decides
#: whether an error is also printed as JSON on stdout).
_JSON_KWARGS = ("as_json", "json_out")


def handle_errors(func: F) -> F:
    """Turn a :class:`CnnbalError` into one line on stderr and exit code 2.

    Also: an ``OSError`` (the environment: an unwritable folder, a full disk)
    is one line and exit 2; Ctrl-C, SIGTERM and SIGHUP are one line and exit
    128 + the signal number, after every temporary output is removed. With
    ``--json`` the error is also printed on stdout as ``{"error": ...,
    "exit_code": 2}``, so a CI step that parses stdout always reads JSON.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        as_json = any(kwargs.get(name) is True for name in _JSON_KWARGS)
        try:
            with signals_as_interrupts():
                return func(*args, **kwargs)
        except CnnbalError as exc:
            _fail(str(exc), 2, as_json)
        except OSError as exc:  # the environment, not a bug: unwritable dir, disk full
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}", 2, as_json)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
            typer.echo(f"interrupted{by}", err=True)
            if as_json:
                print_json({"error": f"interrupted{by}", "exit_code": 128 + int(signum)})
            raise typer.Exit(128 + int(signum)) from None

    return wrapper  # type: ignore[return-value]


def _fail(message: str, code: int, as_json: bool):
    typer.echo(f"error: {message}", err=True)
    if as_json:
        print_json({"error": message, "exit_code": code})
    raise typer.Exit(code) from None


def _console(stderr: bool, quiet: bool):
    from rich.console import Console

    console = Console(stderr=stderr, quiet=quiet)
    if not console.is_terminal:
        # a pipe or CI log: no hard wrap at 80 columns (paths stay whole), and no
        # padding at the ends of lines (rich pads table cells and titles)
        width = None if "COLUMNS" in os.environ else 1 << 16
        stream = _TrimmedLines(sys.stderr if stderr else sys.stdout)
        console = Console(file=stream, quiet=quiet, width=width)
    return console


class _TrimmedLines:
    """A text stream that writes each finished line without its trailing spaces."""

    def __init__(self, stream):
        self._stream = stream
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            self._stream.write("".join(line.rstrip(" ") + "\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        if self._partial:  # an unfinished line goes out as it is
            self._stream.write(self._partial)
            self._partial = ""
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):  # encoding, fileno, ...
        return getattr(self._stream, name)


def stderr_console(quiet: bool = False):
    """A rich console for human messages and tables (stderr when --json owns stdout).

    Not a terminal (a pipe, a CI log): lines are not wrapped. ``quiet``: prints nothing.
    """
    return _console(True, quiet)


def stdout_console(quiet: bool = False):
    """The console for human results on stdout (see :func:`stderr_console`)."""
    return _console(False, quiet)


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


def plain_flags_in_help() -> None:
    """One look for every value in --help: typer 0.29 prints ``--json <bool>`` (as if the
    flag took a value) and ``VAL <path>`` beside an argument's metavar. Flags show no
    type; arguments and options with a metavar show only the metavar."""
    from typer.core import TyperArgument, TyperOption

    for cls in (TyperOption, TyperArgument):
        show = getattr(cls, "display_type_rich", None)
        if show is None or getattr(show, "_cnnbal_plain", False):
            continue

        def display_type_rich(self, ctx, _show=show):
            if getattr(self, "is_flag", False) and self.metavar is None:
                return None
            if isinstance(self, TyperArgument) and self.metavar is not None:
                return None
            return _show(self, ctx)

        display_type_rich._cnnbal_plain = True
        cls.display_type_rich = display_type_rich
