"""File-level API: what each command does, without the command line.

These functions join the rooms (io -> core -> metrics) for one file; the CLI
adds only flags and presentation::

    from cnnbal.pipeline import fit_file, apply_file, evaluate_file
    artifact = fit_file("val.parquet", "H.npz")
    apply_file("H.npz", "test.parquet", "test.corrected.parquet")
    comparison = evaluate_file("test.parquet", "H.npz")
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnbal.artifact import Artifact, load_artifact, save_artifact
from cnnbal.core import DEFAULT_PARAMS, FitParams, argmax_rows, fit
from cnnbal.errors import CnnbalError
from cnnbal.io import (
    Outputs,
    ReadOptions,
    TableWriter,
    atomic_output,
    check_outputs,
    file_sha256,
    iter_chunks,
    probs_columns,
    read_npz_extras,
    read_outputs,
)
from cnnbal.metrics import Comparison, compare

__all__ = [
    "ApplyReport",
    "apply_file",
    "check_compatible",
    "correct",
    "evaluate_file",
    "fit_file",
    "fit_method_outputs",
    "fit_outputs",
    "read_prior",
]


def check_params(params: FitParams) -> None:
    """Reject parameters that make no sense (a CnnbalError naming the flag)."""
    if not 0 <= params.r_low < 1:
        raise CnnbalError(f"--r-low must be in [0, 1), got {params.r_low}")
    if not 0 < params.r_high <= 1:
        raise CnnbalError(f"--r-high must be in (0, 1], got {params.r_high}")
    if params.r_low >= params.r_high:
        raise CnnbalError(f"--r-low ({params.r_low}) must be below --r-high ({params.r_high})")
    if not np.isfinite(params.beta) or params.beta < 0:
        raise CnnbalError(f"--beta must be a finite number >= 0, got {params.beta}")
    if not np.isfinite(params.alpha) or params.alpha <= 0:
        raise CnnbalError(f"--alpha must be a finite number > 0, got {params.alpha}")


def fit_outputs(
    outputs: Outputs,
    method: str = "elaborated",
    params: FitParams = DEFAULT_PARAMS,
    *,
    provenance: dict | None = None,
) -> tuple[Artifact, tuple[str, ...]]:
    """Fit H on validated outputs; returns the artifact and the fit's warnings."""
    check_params(params)
    if outputs.labels is None:
        raise CnnbalError(f"{outputs.path.name}: fitting needs labels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reported through result.warnings
        try:
            # an overflow (huge --beta or --alpha) is reported by the solver, once
            with np.errstate(over="ignore", invalid="ignore"):
                result = fit(outputs.probs, outputs.labels, method, params)
        except OverflowError as exc:
            raise CnnbalError(f"{outputs.path.name}: {exc}") from None
    if outputs.class_names is not None:
        result = dataclasses.replace(
            result, warnings=named_class_notes(result, outputs.class_names)
        )
    artifact = Artifact.from_fit(
        result,
        class_names=outputs.class_names,
        input_sha256=file_sha256(outputs.path),
        input_name=outputs.path.name,
        provenance=provenance,
    )
    return artifact, result.warnings


def named_class_notes(result, class_names: list[str]) -> tuple[str, ...]:
    """The fit's warnings with classes named ("3 (cat)") instead of bare indices."""
    from cnnbal.core import _class_notes

    by_index = _class_notes(result.floored_classes, result.empty_classes, result.class_counts)
    if not by_index:
        return tuple(result.warnings)

    def named(classes):
        return tuple(f"{k} ({class_names[k]})" for k in classes)

    by_name = _class_notes(named(result.floored_classes), named(result.empty_classes), None)
    renamed = dict(zip(by_index, by_name, strict=True))
    return tuple(renamed.get(note, note) for note in result.warnings)


def with_names_from(options: ReadOptions | None, artifact: Artifact) -> ReadOptions:
    """Reading options that fall back on the class names stored in H (string labels)."""
    options = options or ReadOptions()
    if artifact.class_names is None or options.fallback_class_names is not None:
        return options
    return dataclasses.replace(options, fallback_class_names=tuple(artifact.class_names))


def fit_file(
    val_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    method: str = "elaborated",
    params: FitParams = DEFAULT_PARAMS,
    options: ReadOptions | None = None,
) -> Artifact:
    """Read validation outputs, fit a correction, and (with ``out_path``) save the artifact.

    ``method`` is any name of :data:`cnnbal.methods.METHOD_NAMES`; methods
    other than the paper's two choose their hyper-parameters by CV on the file
    (see :func:`fit_method_outputs` for the other options).
    """
    options = options or ReadOptions()
    if out_path is not None:
        given = {"VAL": val_path, "--labels": options.labels_path}
        given["--classes"] = options.classes_path
        check_outputs({"out_path": out_path}, given, suffixes={"out_path": (".npz",)})
    outputs = read_outputs(val_path, options)
    if method in ("elaborated", "naive"):
        artifact, _ = fit_outputs(outputs, method, params)
    else:
        artifact, _ = fit_method_outputs(outputs, method)
    if out_path is not None:
        save_artifact(out_path, artifact)
    return artifact


def check_compatible(artifact: Artifact, n_classes: int, class_names, source: Path, h_name: str):
    """The input's class count (and names, when both are known) must match H."""
    if class_names is not None and len(class_names) != n_classes:
        raise CnnbalError(
            f"{source.name}: {len(class_names)} class names for {n_classes} score columns"
        )
    if n_classes != artifact.n_classes:
        raise CnnbalError(
            f"{source.name}: {n_classes} classes, but {h_name} was fitted for {artifact.n_classes}"
        )
    if class_names is not None and artifact.class_names is not None:
        if list(class_names) != list(artifact.class_names):
            diff = next(
                i
                for i, (a, b) in enumerate(zip(class_names, artifact.class_names, strict=True))
                if a != b
            )
            raise CnnbalError(
                f"{source.name}: class names differ from {h_name} at class {diff} "
                f"({class_names[diff]!r} vs {artifact.class_names[diff]!r})"
            )


def correct(
    artifact: Artifact, probs: np.ndarray, *, clip: bool = True, name: str = "the artifact"
) -> np.ndarray:
    """Apply an artifact's correction, of any kind (docs/method.md section 4 for H).

    Parameters
    ----------
    probs : ndarray of shape (n_samples, n_classes)
    clip : bool
        Affine corrections only: clip negative scores and renormalise.
    name : str
        The artifact's file name, for the error message.

    Returns
    -------
    ndarray of shape (n_samples, n_classes)

    Raises
    ------
    CnnbalError
        The correction produced a non-finite score (a corrupt artifact).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # caught below, in one line
        corrected = artifact.correction.apply(probs, clip=clip)
    _check_finite(corrected, artifact, name)
    return corrected


def _check_finite(corrected: np.ndarray, artifact: Artifact, name: str, offset: int = 0) -> None:
    """A correction must never turn finite inputs into NaN/inf silently."""
    bad = ~np.isfinite(corrected).all(axis=1)
    if bad.any():
        row = offset + int(np.flatnonzero(bad)[0])
        raise CnnbalError(
            f"{name}: the {artifact.kind} correction gives non-finite scores on row {row}; "
            "the artifact is corrupt"
        )


def evaluate_file(
    test_path: str | os.PathLike,
    h_path: str | os.PathLike | None = None,
    *,
    options: ReadOptions | None = None,
) -> tuple[Outputs, Artifact | None, Comparison]:
    """Raw vs corrected metrics on a labelled file (raw vs raw without H).

    String labels are read through H's class names when the file and
    ``options`` give none.
    """
    artifact = load_artifact(h_path) if h_path is not None else None
    if artifact is not None:
        options = with_names_from(options, artifact)
    outputs = read_outputs(test_path, options)
    corrected = outputs.probs
    val_accuracy = None
    if artifact is not None:
        check_compatible(
            artifact, outputs.n_classes, outputs.class_names, outputs.path, Path(h_path).name
        )
        corrected = correct(artifact, outputs.probs, name=Path(h_path).name)
        val_accuracy = artifact.val_class_accuracy
    comparison = compare(outputs.probs, corrected, outputs.labels, val_class_accuracy=val_accuracy)
    return outputs, artifact, comparison


@dataclass(frozen=True)
class ApplyReport:
    """What :func:`apply_file` did."""

    n_rows: int
    #: rows the correction touches: below an affine H's gate; every row for other kinds
    n_corrected: int
    n_changed: int
    output: Path
    n_renormalized: int = 0


_TABLE = (".parquet", ".pq", ".csv")
_ARRAY = (".npz", ".npy")


def apply_file(
    h_path: str | os.PathLike,
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    options: ReadOptions | None = None,
    raw_scores: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ApplyReport:
    """Correct every row of ``in_path`` and write ``out_path``, streaming.

    Tables (parquet/CSV) get the passthrough columns, a ``pred`` column and
    the corrected scores in the input's layout; ``.npz`` gets ``probs``,
    ``pred`` (and ``labels``/``class_names`` when the input has them);
    ``.npy`` gets the corrected matrix. The output is written atomically and
    never over the input.

    Parameters
    ----------
    raw_scores : bool
        Affine corrections: keep the affine scores as they are (may be
        negative) instead of clipping at 0 and renormalising. The other kinds
        always give probabilities.
    progress : callable, optional
        Called with the number of rows done after each block.
    """
    h_path, in_path, out_path = Path(h_path), Path(in_path), Path(out_path)
    options = options or ReadOptions()
    given = {"H": h_path, "INPUT": in_path}
    given.update({"--labels": options.labels_path, "--classes": options.classes_path})
    check_outputs({"-o": out_path}, given)
    artifact = load_artifact(h_path)
    out_suffix = out_path.suffix.lower()
    in_suffix = in_path.suffix.lower()
    if out_suffix not in _TABLE + _ARRAY:
        raise CnnbalError(
            f"{out_path.name}: unsupported output type (use .parquet, .csv, .npz or .npy)"
        )
    family_in = "table" if in_suffix in _TABLE else "array"
    family_out = "table" if out_suffix in _TABLE else "array"
    if in_suffix in _TABLE + _ARRAY and family_in != family_out:
        raise CnnbalError(
            f"{out_path.name}: write a {family_in} input to "
            f"{'.parquet or .csv' if family_in == 'table' else '.npz or .npy'}"
        )
    source = iter_chunks(in_path, with_names_from(options, artifact))
    if source.n_classes is not None:
        check_compatible(artifact, source.n_classes, source.class_names, in_path, h_path.name)
    class_names = source.class_names or artifact.class_names
    n_rows = n_corrected = n_changed = n_renormalized = 0
    inputs = [path for path in given.values() if path is not None]
    with atomic_output(out_path, *inputs) as tmp:
        writer = _make_writer(tmp, out_suffix, source, class_names, options)
        try:
            for chunk in source.chunks:
                check_compatible(
                    artifact, chunk.probs.shape[1], source.class_names, in_path, h_path.name
                )
                row_max = chunk.probs.max(axis=1)
                fixed = artifact.correction.apply(chunk.probs, clip=not raw_scores, row_max=row_max)
                _check_finite(fixed, artifact, h_path.name, chunk.row_offset)
                pred = argmax_rows(fixed)
                n_rows += len(pred)
                # rows the correction touches: below an affine gate, every row otherwise
                n_corrected += int(np.sum(artifact.correction.changes_rows(row_max)))
                # changed: the new prediction is not a top class of the raw row
                # (a gather, instead of a second argmax over the whole block)
                raw_at_pred = chunk.probs[np.arange(len(pred)), pred]
                n_changed += int(np.sum(raw_at_pred < row_max))
                n_renormalized += chunk.n_renormalized
                writer.write(chunk, fixed, pred)
                if progress is not None:
                    progress(n_rows)
        except BaseException:
            writer.abort()  # release the temporary file; atomic_output removes it
            raise
        writer.close()
    return ApplyReport(n_rows, n_corrected, n_changed, out_path, n_renormalized)


def _make_writer(tmp: Path, suffix: str, source, class_names, options):
    if suffix in _TABLE:
        return _TableSink(tmp, suffix, source, class_names)
    if suffix == ".npy":
        return _NpySink(tmp, source)
    return _NpzSink(tmp, class_names, source, options)


def _pred_names(pred: np.ndarray, class_names) -> np.ndarray:
    """The class name of each prediction, shape (rows,) str."""
    return np.asarray(class_names, dtype=str)[pred]


class _TableSink:
    def __init__(self, tmp, suffix, source, class_names):
        self.layout = source.layout
        self.csv = suffix == ".csv"
        self.source = source.path.name
        self.class_names = class_names
        self.writer = TableWriter(tmp, ".csv" if self.csv else ".parquet", class_names)

    def write(self, chunk, fixed, pred):
        import pyarrow as pa

        columns = {}
        if chunk.passthrough is not None:
            for name in chunk.passthrough.schema.names:
                column = chunk.passthrough.column(name)
                if self.csv and pa.types.is_nested(column.type):
                    raise CnnbalError(
                        f"{self.source}: column {name!r} ({column.type}) cannot be written to "
                        "CSV; write .parquet instead"
                    )
                columns[name] = column
        else:  # an array input written as a table: keep its labels
            if chunk.labels is not None:
                columns["label"] = pa.array(chunk.labels)
        columns["pred"] = pa.array(pred.astype(np.int64))
        if self.class_names is not None:
            columns["pred_name"] = pa.array(_pred_names(pred, self.class_names))
        # CSV is text: float32 keeps every digit a model's softmax has and
        # writes ~9 characters a number instead of float64's 17
        scores = fixed.astype(np.float32, copy=False) if self.csv else fixed
        columns.update(probs_columns(scores, self.layout, flat=self.csv))
        self.writer.write(pa.RecordBatch.from_pydict(columns))

    def close(self):
        self.writer.close()

    abort = close  # the partial file is closed, then removed with the temporary path


class _NpySink:
    """Streams the corrected rows into a ``.npy`` with ordinary writes.

    Not a memory map: a write that fails (a full disk) is then an ``OSError``
    at the ``write`` call, not a SIGBUS when a dirty page is flushed. The
    header declares the row count from the start; rows arrive in order.
    """

    def __init__(self, tmp, source):
        self.tmp = tmp
        self.n_rows = source.n_rows
        self.fh = None
        self.rows_written = 0

    def write(self, chunk, fixed, pred):
        if self.fh is None:
            self.fh = open(self.tmp, "wb")  # closed in close/abort
            header = {
                "descr": np.lib.format.dtype_to_descr(fixed.dtype),
                "fortran_order": False,
                "shape": (self.n_rows, fixed.shape[1]),
            }
            np.lib.format.write_array_header_1_0(self.fh, header)
        if chunk.row_offset != self.rows_written:  # pragma: no cover - readers yield in order
            raise RuntimeError("apply: .npy rows arrived out of order")
        self.fh.write(np.ascontiguousarray(fixed).data)
        self.rows_written += len(fixed)

    def close(self):
        if self.fh is not None:
            self.fh.close()

    def abort(self):
        if self.fh is not None:
            with contextlib.suppress(OSError):
                self.fh.close()


class _NpzSink:
    """Collects the blocks; at close writes ``probs``, ``pred`` (``pred_name``), the
    labels and class names, and every other array of an ``.npz`` input (ids)."""

    def __init__(self, tmp, class_names, source, options):
        self.tmp = tmp
        self.class_names = class_names
        self.source = source.path
        self.options = options
        self.parts = []

    def write(self, chunk, fixed, pred):
        self.parts.append((fixed, pred, chunk.labels))

    def abort(self):
        self.parts = []  # nothing was written yet: the archive is made at close

    def close(self):
        if not self.parts:
            return
        arrays = {
            "probs": np.concatenate([p[0] for p in self.parts]),
            "pred": np.concatenate([p[1] for p in self.parts]).astype(np.int64),
        }
        if self.parts[0][2] is not None:
            arrays["labels"] = np.concatenate([p[2] for p in self.parts])
        if self.class_names is not None:
            arrays["class_names"] = np.array(self.class_names, dtype=str)
            arrays["pred_name"] = _pred_names(arrays["pred"], self.class_names)
        if self.source.suffix.lower() == ".npz":  # keep the input's ids and the like
            arrays = {**read_npz_extras(self.source, self.options, skip=arrays), **arrays}
        with open(self.tmp, "wb") as fh:
            np.savez(fh, **arrays)


def fit_method_outputs(
    outputs: Outputs,
    method: str,
    *,
    hyper: dict[str, float] | None = None,
    prior: str | np.ndarray = "uniform",
    unlabelled: bool = False,
    n_folds: int = 5,
    seed: int = 0,
    objective: str = "worst20",
    max_total_drop: float = 0.5,
    params: FitParams | None = None,
    provenance: dict | None = None,
):
    """Fit any method of :data:`cnnbal.methods.METHOD_NAMES` on validated outputs.

    Hyper-parameters not in ``hyper`` are chosen by stratified k-fold CV on
    the outputs (:func:`cnnbal.methods.fit_method`, which documents every
    argument); ``unlabelled`` fits ``prior-match`` without looking at labels.

    Returns
    -------
    artifact : Artifact
    fitted : MethodFit
        With the CV record (``fitted.cv``) and the fit's warnings.
    """
    from cnnbal.methods import fit_method

    if params is not None:
        check_params(params)
    labels = None if unlabelled else outputs.labels
    if labels is None and not unlabelled:
        raise CnnbalError(f"{outputs.path.name}: fitting {method} needs labels")
    fitted = fit_method(
        method,
        outputs.probs,
        labels,
        hyper=hyper,
        prior=prior,
        unlabelled=unlabelled,
        n_folds=n_folds,
        seed=seed,
        objective=objective,
        max_total_drop=max_total_drop,
        params=params,
    )
    recorded = dict(provenance or {})
    if method == "prior-match":
        recorded.setdefault(
            "prior",
            prior if isinstance(prior, str) else np.asarray(prior, dtype=float).tolist(),
        )
        recorded.setdefault("unlabelled", bool(unlabelled))
    artifact = Artifact.from_method_fit(
        fitted,
        class_names=outputs.class_names,
        input_sha256=file_sha256(outputs.path),
        input_name=outputs.path.name,
        provenance=recorded,
    )
    return artifact, fitted


def read_prior(path: str | os.PathLike, n_classes: int) -> np.ndarray:
    """A target class prior from a file: ``.npy`` (1-D) or text (numbers, one per line or
    separated by commas/spaces).

    Returns
    -------
    ndarray of shape (n_classes,), float64
        Positive weights, normalised to sum to 1.

    Raises
    ------
    CnnbalError
        Unreadable file, wrong count, or a weight that is not a positive number.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise CnnbalError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            text = path.read_text(encoding="utf-8")
            values = np.array([float(v) for v in text.replace(",", " ").split()])
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CnnbalError(f"{name}: not a readable prior ({exc})") from None
    if values.dtype.kind not in "iuf" or values.ndim != 1:
        raise CnnbalError(
            f"{name}: a prior is a list of numbers, not {values.dtype} {values.shape}"
        )
    values = values.astype(np.float64)
    if len(values) != n_classes:
        raise CnnbalError(f"{name}: {len(values)} prior weights, but the outputs have {n_classes}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise CnnbalError(f"{name}: prior weights must be positive numbers")
    return values / values.sum()
