"""File-level API: what each command does, without the command line.

These functions join the rooms (io -> core -> metrics) for one file; the CLI
adds only flags and presentation::

    from cnnbal.pipeline import fit_file, apply_file, evaluate_file
    artifact = fit_file("val.parquet", "H.npz")
    apply_file("H.npz", "test.parquet", "test.corrected.parquet")
    comparison = evaluate_file("test.parquet", "H.npz")
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnbal import _buffers
from cnnbal._dataset_stats import (
    dataset_sha256,
    evaluate_dataset,
    fit_dataset,
    shard_class_counts,
    shard_eval_stats,
    shard_fit_system,
    shard_naive_stats,
)
from cnnbal._overlap import Overlap, one_blas_thread, overlap_depth
from cnnbal.artifact import Artifact, load_artifact, save_artifact
from cnnbal.core import DEFAULT_PARAMS, FitParams, fit
from cnnbal.errors import CnnbalError
from cnnbal.io import (
    CHUNK_ROWS,
    Dataset,
    Outputs,
    ReadOptions,
    Shard,
    TableWriter,
    atomic_output,
    check_not_input,
    check_outputs,
    file_sha256,
    iter_chunks,
    probs_columns,
    read_npz_extras,
    read_outputs,
)
from cnnbal.io.datasets import write_h_sidecar
from cnnbal.io.options import H_SHA256_KEY, H_SHA256_MEMBER
from cnnbal.metrics import Comparison, compare

if TYPE_CHECKING:  # pragma: no cover
    from cnnbal.engine import Engine

__all__ = [
    "ApplyPlan",
    "ApplyReport",
    "DatasetApplyReport",
    "apply_chunk_rows",
    "apply_dataset",
    "apply_file",
    "apply_shard",
    "check_compatible",
    "correct",
    "dataset_sha256",
    "evaluate_dataset",
    "evaluate_file",
    "fit_dataset",
    "fit_file",
    "fit_method_outputs",
    "fit_outputs",
    "read_prior",
    "shard_class_counts",
    "shard_eval_stats",
    "shard_fit_system",
    "shard_naive_stats",
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
    check_finite_correction(corrected, artifact.kind, name, offset)


def check_finite_correction(corrected: np.ndarray, kind: str, name: str, offset: int = 0) -> None:
    """:func:`_check_finite` from the correction's kind (what per-shard workers have)."""
    bad = ~np.isfinite(corrected).all(axis=1)
    if bad.any():
        raise CnnbalError(_nonfinite_text(kind, name, offset + int(np.flatnonzero(bad)[0])))


def _nonfinite_text(kind: str, name: str, row: int) -> str:
    return (
        f"{name}: the {kind} correction gives non-finite scores on row {row}; "
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
    """What :func:`apply_file` (or one shard of :func:`apply_dataset`) did.

    ``skipped`` is True for a shard whose output already held the same H's
    correction (a re-run after a failure); its counts are then 0.
    """

    n_rows: int
    #: rows the correction touches: below an affine H's gate; every row for other kinds
    n_corrected: int
    n_changed: int
    output: Path
    skipped: bool = False
    n_renormalized: int = 0


_TABLE = (".parquet", ".pq", ".csv")
_ARRAY = (".npz", ".npy")
#: Name of the prediction column (tables) or member (``.npz``) that apply adds.
PRED_COLUMN = "pred"


def apply_file(
    h_path: str | os.PathLike,
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    options: ReadOptions | None = None,
    raw_scores: bool = False,
    progress: Callable[[int], None] | None = None,
    pred_column: str = PRED_COLUMN,
    force: bool = False,
    filesystem=None,
    engine: Engine | None = None,
) -> ApplyReport:
    """Correct every row of ``in_path`` and write ``out_path``, streaming.

    Tables (parquet/CSV) get the passthrough columns, a ``pred`` column and
    the corrected scores in the input's layout; ``.npz`` gets ``probs``,
    ``pred`` (and ``labels``/``class_names`` when the input has them);
    ``.npy`` gets the corrected matrix. The output is written atomically and
    never over the input. The SHA-256 of ``h_path`` is recorded in the output
    (parquet schema metadata ``cnnbal.h_sha256``, ``.npz`` member
    ``cnnbal_h_sha256``, for ``.npy``/CSV a sidecar ``OUTPUT.cnnbal.json``).

    Parameters
    ----------
    raw_scores : bool
        Affine corrections: keep the affine scores as they are (may be
        negative) instead of clipping at 0 and renormalising. The other kinds
        always give probabilities.
    progress : callable, optional
        Called with the number of rows done after each block.
    pred_column : str
        Name of the prediction column; an input column of that name is refused.
    force : bool
        Correct an input that already records an applied H (else refused).
    filesystem : pyarrow.fs.FileSystem, optional
        Read ``in_path`` through it (a remote input, see :class:`cnnbal.io.Shard`).
    engine : Engine, optional
        Run the correction there (e.g. a Dask worker) instead of in this
        process; ``progress`` is then not called.
    """
    h_path, in_path, out_path = Path(h_path), Path(in_path), Path(out_path)
    options = options or ReadOptions()
    given = {"H": h_path, "INPUT": in_path}
    given.update({"--labels": options.labels_path, "--classes": options.classes_path})
    check_outputs({"-o": out_path}, given)
    artifact = load_artifact(h_path)
    plan = ApplyPlan(
        artifact,
        file_sha256(h_path),
        h_path.name,
        with_names_from(options, artifact),  # string labels read through H's class names
        raw_scores,
        pred_column,
        force,
        apply_chunk_rows(artifact.n_classes),
    )
    _check_output_suffix(out_path, in_path.suffix.lower())
    _refuse_corrected(plan, str(in_path), filesystem, in_path.name)
    # every local file named on the command line: never the output
    inputs = tuple(p for p in given.values() if p is not None)
    if filesystem is not None:
        inputs = tuple(p for p in inputs if p is not in_path)
    if engine is not None:
        check_not_input(out_path, *inputs)
        shard = Shard(str(in_path), in_path.name, filesystem=filesystem)
        return engine.map(partial(apply_shard, plan), [(shard, str(out_path))])[0]
    source = iter_chunks(
        in_path, plan.options, plan.chunk_rows, filesystem=filesystem, decode_threads=False
    )
    return _apply_source(plan, source, out_path, inputs, progress)


@dataclass(frozen=True)
class ApplyPlan:
    """Everything one shard's apply needs; picklable, sent to worker processes.

    Attributes
    ----------
    artifact : Artifact
    h_sha256 : str
        SHA-256 of the H file, recorded in every output.
    h_name : str
        The H file's name (messages).
    options : ReadOptions
    raw_scores : bool
    pred_column : str
    force : bool
        Correct inputs that already record an applied H.
    chunk_rows : int
        Rows a block (:func:`apply_chunk_rows`).
    """

    artifact: Artifact
    h_sha256: str
    h_name: str
    options: ReadOptions
    raw_scores: bool = False
    pred_column: str = PRED_COLUMN
    force: bool = False
    chunk_rows: int = CHUNK_ROWS


#: Values (rows x classes) a block of apply: 65,536 rows at K = 100, 26 MB of float32.
APPLY_CHUNK_VALUES = CHUNK_ROWS * 100


def apply_chunk_rows(n_classes: int | None) -> int:
    """Rows a block of ``apply``: :data:`CHUNK_ROWS`, fewer for K above 100.

    About five blocks are in flight at once (read ahead, corrected, written
    behind), each held as scores and corrected scores: with 65,536 rows at
    K = 1,000 that was ~4 GB; at most :data:`APPLY_CHUNK_VALUES` values a
    block keeps it near 0.4 GB for any K.
    """
    if not n_classes:
        return CHUNK_ROWS
    return int(max(1024, min(CHUNK_ROWS, APPLY_CHUNK_VALUES // n_classes)))


def _check_output_suffix(out_path: Path, in_suffix: str) -> None:
    out_suffix = out_path.suffix.lower()
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


def _refuse_corrected(plan: ApplyPlan, location: str, filesystem, name: str) -> None:
    """An input that records an applied H was corrected already: correcting twice harms."""
    if plan.force:
        return
    from cnnbal.io.datasets import recorded_h_sha256

    recorded = recorded_h_sha256(location, filesystem)
    if recorded is not None:
        raise CnnbalError(
            f"{name}: already corrected by cnnbal apply (H sha256 {recorded[:12]}...); "
            "pass --force to correct it again"
        )


def _apply_source(
    plan: ApplyPlan,
    source,
    out_path: Path,
    inputs: tuple,
    progress: Callable[[int], None] | None = None,
) -> ApplyReport:
    """Stream ``source`` through the correction into ``out_path`` (atomic)."""
    reports: list[ApplyReport] = []
    _apply_pipelined(
        plan,
        [(lambda: source, out_path, inputs)],
        on_done=lambda _, report: reports.append(report),
        progress=progress,
        read_ahead=source.kind == "table",
    )
    return reports[0]


class _ShardRun:
    """One output being written: its temporary file, its writer and its counts.

    Made and fed in the main thread (:meth:`correct`); written and finished
    in the writer thread (:meth:`write`, :meth:`finish`), in order.
    """

    def __init__(self, plan: ApplyPlan, source, out_path: Path, inputs: tuple):
        artifact = plan.artifact
        self.plan, self.source, self.out_path = plan, source, out_path
        self.in_label = Path(str(source.path))
        if source.n_classes is not None:
            check_compatible(
                artifact, source.n_classes, source.class_names, self.in_label, plan.h_name
            )
        self.suffix = out_path.suffix.lower()
        self.n_rows = self.n_corrected = self.n_changed = self.n_renormalized = 0
        self.done = self.write_failed = False
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_output(out_path, *inputs))
        try:
            class_names = source.class_names or artifact.class_names
            self.writer = _make_writer(tmp, self.suffix, source, class_names, plan)
        except BaseException as exc:
            self.writer = None
            self.abort(exc)
            raise

    def correct(self, chunk) -> tuple[np.ndarray, np.ndarray]:
        """The corrected block and its predictions; counts what changed."""
        plan, artifact = self.plan, self.plan.artifact
        check_compatible(
            artifact, chunk.probs.shape[1], self.source.class_names, self.in_label, plan.h_name
        )
        row_max = chunk.probs.max(axis=1)
        fixed, pred, bad = artifact.correction.apply_predict(
            chunk.probs, clip=not plan.raw_scores, row_max=row_max
        )
        if bad is not None:
            row = chunk.row_offset + bad
            raise CnnbalError(_nonfinite_text(artifact.kind, plan.h_name, row))
        self.n_rows += len(pred)
        # rows the correction touches: below an affine gate, every row otherwise
        self.n_corrected += int(np.count_nonzero(artifact.correction.changes_rows(row_max)))
        # changed: the new prediction is not a top class of the raw row
        # (a gather, instead of a second argmax over the whole block)
        raw_at_pred = chunk.probs[np.arange(len(pred)), pred]
        self.n_changed += int(np.count_nonzero(raw_at_pred < row_max))
        self.n_renormalized += chunk.n_renormalized
        return fixed, pred

    def write(self, chunk, fixed, pred) -> None:
        try:
            self.writer.write(chunk, fixed, pred)
        except BaseException:
            self.write_failed = True  # raised in the main thread; finish must not commit
            raise

    def finish(self) -> ApplyReport | None:
        """Close the file and move it into place (then the sidecar, for .npy/CSV).

        None, and nothing moved, when a block's write failed: the writer thread
        runs this after every write of the shard, and the main thread, which
        gets that error first, removes the file.
        """
        if self.write_failed:
            return None
        try:
            self.writer.close()
        except BaseException as exc:
            self.abort(exc)  # may raise a clearer error (a full disk, named)
            raise
        self.done = True
        self._stack.close()  # atomic_output: the rename; on failure it removes the file
        if self.suffix in (".npy", ".csv"):
            write_h_sidecar(self.out_path, self.plan.h_sha256, self.plan.h_name)
        return ApplyReport(
            self.n_rows,
            self.n_corrected,
            self.n_changed,
            self.out_path,
            n_renormalized=self.n_renormalized,
        )

    def abort(self, exc: BaseException) -> None:
        """Remove the temporary file (idempotent); may raise a clearer error for ``exc``."""
        if self.done:
            return
        self.done = True
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.abort()  # release the temporary file; atomic_output removes it
        self._stack.__exit__(type(exc), exc, exc.__traceback__)


#: What the reader thread yields between shards.
_OPEN, _END = "open", "end"


def _apply_pipelined(
    plan: ApplyPlan,
    jobs: list[tuple[Callable[[], object], Path, tuple]],
    *,
    on_done: Callable[[int, ApplyReport], None],
    progress: Callable[[int], None] | None = None,
    read_ahead: bool = True,
) -> None:
    """Correct each ``(open_source, out_path, inputs)`` in turn, in this process.

    ``read_ahead``: decode the next blocks on the reader thread (tables). Array
    inputs are read in turn: a memory-mapped ``.npy`` releases each block's pages
    when the next one is read, so it must not run ahead of the correction.

    One reader and one writer thread serve every output (:class:`cnnbal._overlap.Overlap`):
    the next shard is opened and read while the last one's final blocks are
    written and its file closed, so the pipeline does not drain at each shard
    boundary (with 4 blocks a shard, that cost a third of the run on 2 cores).
    ``on_done(index, report)`` runs in this thread once shard ``index`` is in
    place; on an error the shard being written is removed, the finished ones
    stay, and the error is raised.
    """
    finished: collections.deque = collections.deque()

    def items():  # the reader thread
        for index, (open_source, _, _) in enumerate(jobs):
            source = open_source()
            yield _OPEN, index, source
            for chunk in source.chunks:
                yield None, index, chunk
            yield _END, index, None

    def finish(index: int, run: _ShardRun) -> None:  # the writer thread
        report = run.finish()
        if report is not None:
            finished.append((index, report))

    def report_finished() -> None:
        while finished:
            on_done(*finished.popleft())

    runs: list[_ShardRun] = []
    run: _ShardRun | None = None
    n_rows = 0
    depth = overlap_depth()
    with Overlap(depth, read_ahead=read_ahead) as overlap, one_blas_thread(), _buffers.reuse():
        try:
            for step, index, payload in overlap.read_ahead(items()):
                if step is _OPEN:
                    _, out_path, inputs = jobs[index]
                    run = _ShardRun(plan, payload, out_path, inputs)
                    runs = [started for started in runs if not started.done] + [run]
                elif step is _END:
                    overlap.write_behind(finish, index, run)
                    run = None
                else:
                    fixed, pred = run.correct(payload)
                    overlap.write_behind(run.write, payload, fixed, pred)
                    n_rows += len(pred)
                    if progress is not None:
                        progress(n_rows)
                report_finished()
            overlap.drain()
        except BaseException as exc:
            overlap.drain(raise_errors=False)
            clearer = None
            for started in runs:  # remove what is not in place yet
                try:
                    started.abort(exc)
                except BaseException as named:  # a clearer error for exc (a full disk)
                    clearer = clearer or named
            if clearer is not None:
                raise clearer from None
            raise
        finally:
            report_finished()


# ------------------------------------------------------------------ apply on a dataset


@dataclass(frozen=True)
class DatasetApplyReport:
    """What :func:`apply_dataset` did: one :class:`ApplyReport` per shard, in shard order."""

    shards: tuple[ApplyReport, ...]
    output_dir: Path

    @property
    def n_rows(self) -> int:
        return sum(r.n_rows for r in self.shards)

    @property
    def n_corrected(self) -> int:
        return sum(r.n_corrected for r in self.shards)

    @property
    def n_changed(self) -> int:
        return sum(r.n_changed for r in self.shards)

    @property
    def n_skipped(self) -> int:
        return sum(r.skipped for r in self.shards)

    @property
    def n_renormalized(self) -> int:
        return sum(r.n_renormalized for r in self.shards)


def apply_dataset(
    h_path: str | os.PathLike,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    *,
    raw_scores: bool = False,
    pred_column: str = PRED_COLUMN,
    force: bool = False,
    overwrite: bool = False,
    engine: Engine | None = None,
    on_shard: Callable[[int, ApplyReport], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> DatasetApplyReport:
    """Correct every shard of ``dataset`` into ``out_dir``, mirroring the shard names.

    Each shard ``REL`` (its path relative to the dataset root, hive partition
    folders included) is written atomically to ``out_dir/REL`` in its own
    format, recording the SHA-256 of ``h_path``. A shard whose output exists
    and records the same H is skipped (a re-run after a failure finishes the
    job); one that records another H, or none, is refused before any work
    unless ``overwrite``.

    Parameters
    ----------
    dataset : Dataset
        From :func:`cnnbal.io.open_dataset`.
    out_dir : path
        Created when missing. Local only.
    engine : Engine, optional
        Where the shards run (default: this process).
    on_shard : callable, optional
        ``on_shard(index, report)`` in this process as each shard finishes.
    on_rows : callable, optional
        ``on_rows(n)``: rows corrected so far in this run (skipped shards not
        counted), after each block when the shards run in this process (one at
        a time), else as each shard finishes.

    Returns
    -------
    DatasetApplyReport
    """
    from cnnbal.engine import LocalEngine

    h_path, out_dir = Path(h_path), Path(out_dir)
    if "://" in str(out_dir):
        raise CnnbalError(f"{out_dir}: the output folder must be a local path")
    if out_dir.exists() and not out_dir.is_dir():
        raise CnnbalError(f"{out_dir}: exists and is not a directory")
    artifact = load_artifact(h_path)
    check_compatible(
        artifact, dataset.n_classes, dataset.class_names, Path(dataset.label), h_path.name
    )
    plan = ApplyPlan(
        artifact,
        file_sha256(h_path),
        h_path.name,
        with_names_from(dataset.options, artifact),
        raw_scores,
        pred_column,
        force,
        apply_chunk_rows(dataset.n_classes),
    )
    # every check before any work: a refused shard must not leave half a folder behind
    todo: list[int] = []
    reports: list[ApplyReport | None] = [None] * len(dataset.shards)
    for i, shard in enumerate(dataset.shards):
        target = out_dir / shard.relpath
        if shard.filesystem is None:
            check_not_input(target, shard.location, h_path)
        _refuse_corrected(plan, shard.location, shard.filesystem, shard.relpath)
        if target.exists() and not overwrite:
            from cnnbal.io.datasets import recorded_h_sha256

            recorded = recorded_h_sha256(target)
            if recorded == plan.h_sha256:
                reports[i] = ApplyReport(0, 0, 0, target, skipped=True)
                continue
            why = "another H" if recorded else "no record of an H"
            raise CnnbalError(f"{target}: exists with {why}; pass --overwrite to replace it")
        todo.append(i)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, report in enumerate(reports):
        if report is not None and on_shard is not None:
            on_shard(i, report)
    engine = engine or LocalEngine(1)
    tasks = [(dataset.shards[i], str(out_dir / dataset.shards[i].relpath)) for i in todo]

    in_process = isinstance(engine, LocalEngine) and (engine.workers == 1 or len(tasks) == 1)
    rows_done = [0]

    def done(index: int, report: ApplyReport) -> None:
        reports[todo[index]] = report
        if on_shard is not None:
            on_shard(todo[index], report)
        if on_rows is not None and not in_process:
            rows_done[0] += report.n_rows
            on_rows(rows_done[0])

    if in_process:
        # one shard at a time in this process: one pipeline through all of them
        jobs = [
            (partial(_open_shard, plan, shard, out), Path(out), _local_inputs(shard))
            for shard, out in tasks
        ]
        _apply_pipelined(
            plan, jobs, on_done=done, progress=on_rows, read_ahead=dataset.kind == "table"
        )
    else:
        engine.map(partial(apply_shard, plan), tasks, on_result=done)
    return DatasetApplyReport(tuple(reports), out_dir)


def apply_shard(plan: ApplyPlan, task: tuple[Shard, str]) -> ApplyReport:
    """Correct one shard into its output path (the per-shard function engines run).

    Parameters
    ----------
    plan : ApplyPlan
    task : (Shard, str)
        The shard and its output path (parent folders are created).
    """
    shard, out_path = task
    source = _open_shard(plan, shard, out_path)
    return _apply_source(plan, source, Path(out_path), _local_inputs(shard))


def _open_shard(plan: ApplyPlan, shard: Shard, out_path: str):
    """Open ``shard`` for streaming, creating its output's parent folders."""
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    # the correction and the writer keep the other cores busy: decoding on
    # pyarrow's pool as well cost 25% more CPU time for the same blocks
    return shard.open(plan.options, chunk_rows=plan.chunk_rows, decode_threads=False)


def _local_inputs(shard: Shard) -> tuple:
    """The paths an output must never replace: a local shard's own file."""
    return (shard.location,) if shard.filesystem is None else ()


def _make_writer(tmp: Path, suffix: str, source, class_names, plan: ApplyPlan):
    if suffix in _TABLE:
        return _TableSink(tmp, suffix, source, class_names, plan)
    if suffix == ".npy":
        return _NpySink(tmp, source)
    return _NpzSink(tmp, class_names, source, plan)


def _pred_names(pred: np.ndarray, class_names) -> np.ndarray:
    """The class name of each prediction, shape (rows,) str."""
    return np.asarray(class_names, dtype=str)[pred]


class _TableSink:
    def __init__(self, tmp, suffix, source, class_names, plan):
        self.layout = source.layout
        self.csv = suffix == ".csv"
        self.source = source.path.name
        self.pred_column = plan.pred_column
        self.class_names = class_names
        self.writer = TableWriter(
            tmp,
            ".csv" if self.csv else ".parquet",
            class_names,
            metadata={H_SHA256_KEY: plan.h_sha256.encode()},
        )

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
        if self.pred_column in columns:
            raise CnnbalError(
                f"{self.source}: already has a column {self.pred_column!r}; name the "
                "prediction column with --pred-column NAME"
            )
        columns[self.pred_column] = pa.array(pred.astype(np.int64))
        if self.class_names is not None:
            columns[f"{self.pred_column}_name"] = pa.array(_pred_names(pred, self.class_names))
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
    labels and class names, the H's SHA-256, and every other array of a local
    ``.npz`` input (ids)."""

    def __init__(self, tmp, class_names, source, plan):
        self.tmp = tmp
        self.class_names = class_names
        self.pred_member = plan.pred_column
        self.h_sha256 = plan.h_sha256
        self.source = source.path
        self.options = plan.options
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
            self.pred_member: np.concatenate([p[1] for p in self.parts]).astype(np.int64),
        }
        if self.parts[0][2] is not None:
            arrays["labels"] = np.concatenate([p[2] for p in self.parts])
        if self.class_names is not None:
            arrays["class_names"] = np.array(self.class_names, dtype=str)
            arrays[f"{self.pred_member}_name"] = _pred_names(
                arrays[self.pred_member], self.class_names
            )
        arrays[H_SHA256_MEMBER] = np.array(self.h_sha256)
        # keep the input's ids and the like (a local input: remote ones are read once)
        if isinstance(self.source, Path) and self.source.suffix.lower() == ".npz":
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
    input_sha256: str | None = None,
    input_name: str | None = None,
):
    """Fit any method of :data:`cnnbal.methods.METHOD_NAMES` on validated outputs.

    Hyper-parameters not in ``hyper`` are chosen by stratified k-fold CV on
    the outputs (:func:`cnnbal.methods.fit_method`, which documents every
    argument); ``unlabelled`` fits ``prior-match`` without looking at labels.
    ``input_sha256`` / ``input_name`` name the data in the artifact when the
    rows came from several files (default: ``outputs.path``'s hash and name).

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
        # a dataset's rows come from several files: the caller names them
        input_sha256=input_sha256 or file_sha256(outputs.path),
        input_name=input_name or outputs.path.name,
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
