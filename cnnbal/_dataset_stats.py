"""Fit and evaluate over a dataset, streaming: the per-shard workers and their reductions.

Re-exported by :mod:`cnnbal.pipeline` (``fit_dataset``, ``evaluate_dataset``
and the ``shard_*`` workers); kept apart from the apply code. Every shard is
read chunk by chunk into the mergeable statistics of :mod:`cnnbal.stats`, so
memory depends on the chunk and on K, never on the number of rows. The
workers are module-level functions of ``(shard, *, keywords)``: a
``functools.partial`` of one can be shipped to worker processes or a Dask
cluster by an :class:`cnnbal.engine.Engine`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial, reduce
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from cnnbal import _buffers
from cnnbal._overlap import TABLE_SUFFIXES, Overlap, one_blas_thread, overlap_depth
from cnnbal.artifact import Artifact
from cnnbal.core import DEFAULT_PARAMS, METHODS, FitParams, fit
from cnnbal.errors import CnnbalError
from cnnbal.io import CHUNK_ROWS, ReadOptions, file_sha256
from cnnbal.metrics import Comparison
from cnnbal.stats import (
    ClassCountStats,
    EvalStats,
    FitStats,
    NormalEquationStats,
    merge_stats,
)

if TYPE_CHECKING:  # pragma: no cover
    from cnnbal.corrections import Correction
    from cnnbal.engine import Engine
    from cnnbal.io import Dataset, Shard

#: Rows per chunk are capped so that one float64 copy of a chunk stays near this
#: many bytes: K = 100 keeps 40k-row chunks, K = 2,000 reads 2k rows at a time
#: (a fixed 65k-row chunk would be a 1 GB float64 copy there).
CHUNK_BYTES = 32 << 20


def stream_chunk_rows(n_classes: int, chunk_rows: int = CHUNK_ROWS) -> int:
    """Rows per chunk for fit/evaluate: ``chunk_rows``, fewer for large K (:data:`CHUNK_BYTES`)."""
    return int(max(256, min(chunk_rows, CHUNK_BYTES // (8 * max(n_classes, 1)))))


def _as_dataset(dataset, options: ReadOptions | None) -> Dataset:
    from cnnbal.io import Dataset, open_dataset

    if isinstance(dataset, Dataset):
        return dataset
    if isinstance(dataset, (str, os.PathLike)):
        dataset = [dataset]
    return open_dataset(list(dataset), options, require_labels=True)


def _chunks(
    shard: Shard,
    options: ReadOptions,
    n_classes: int,
    chunk_rows: int,
    *,
    row_major=False,
    renormalized: list[int] | None = None,
):
    """``(probs, labels)`` blocks of a shard (tables give column-major blocks).

    ``row_major`` copies column-major blocks to the layout of the in-memory
    read (evaluate needs it for bit-identical metrics; the fit's sums agree to
    rounding either way, so it skips the copy).
    """
    # tables only: decoding is the work worth a thread, and a memory-mapped
    # .npy must not be read ahead (see cnnbal._overlap.Overlap)
    depth = overlap_depth() if shard.suffix in TABLE_SUFFIXES else 0
    # with a reader thread, decoding on it alone costs less CPU time than on
    # pyarrow's pool too (the main thread keeps the other core busy)
    source = shard.open(
        options, chunk_rows=chunk_rows, require_labels=True, decode_threads=depth == 0
    )
    # the next blocks are read and validated on a reader thread while this one is
    # counted (16 x 250k x 100 evaluate: decoding was 27% of the time)
    # and while it reads, the blocks are counted on one BLAS thread: a second one
    # only spins on the core the reader needs (2 cores: 12.6 s of CPU time for
    # 6.5 s of wall time)
    blas = one_blas_thread() if depth else contextlib.nullcontext()
    # the blocks' memory is reused (cnnbal._buffers): allocated on the reader
    # thread and freed on this one, fresh blocks made the heap grow with the
    # rows (peak RSS 1.19x from 4M to 16M rows)
    with Overlap(depth) as overlap, blas, _buffers.reuse():
        for chunk in overlap.read_ahead(source.chunks):
            if renormalized is not None:
                renormalized[0] += chunk.n_renormalized
            if chunk.probs.shape[1] != n_classes:
                raise CnnbalError(
                    f"{shard.name}: {chunk.probs.shape[1]} classes, the dataset has {n_classes}"
                )
            # row-major like read_outputs: the corrected scores (a float32 GEMM) are
            # then computed by the same kernel as in memory, so metrics agree to the bit
            probs = chunk.probs
            if row_major and not probs.flags.c_contiguous:
                probs = _buffers.empty(chunk.probs.shape, chunk.probs.dtype)
                probs[...] = chunk.probs
            yield probs, chunk.labels


# ------------------------------------------------------------------ workers


@dataclass(frozen=True)
class Counted:
    """A statistic and the rows ``--renormalize`` divided by their sum (a reading fact)."""

    stats: object
    n_renormalized: int = 0

    def merge(self, other: Counted) -> Counted:
        return Counted(self.stats.merge(other.stats), self.n_renormalized + other.n_renormalized)


def shard_class_counts(
    shard: Shard, *, options: ReadOptions, n_classes: int, chunk_rows: int = CHUNK_ROWS
) -> Counted:
    """The fit's first pass over one shard: :class:`ClassCountStats` and the renormalized rows."""
    total, renormalized = ClassCountStats.empty(n_classes), [0]
    for probs, labels in _chunks(shard, options, n_classes, chunk_rows, renormalized=renormalized):
        total = total.merge(ClassCountStats.from_chunk(probs, labels, n_classes))
    return Counted(total, renormalized[0])


def shard_fit_system(
    shard: Shard,
    *,
    options: ReadOptions,
    n_classes: int,
    method: str,
    params: FitParams,
    class_weight_sq: np.ndarray | None,
    chunk_rows: int = CHUNK_ROWS,
) -> NormalEquationStats:
    """The fit's second pass over one shard (the weights come from the merged first pass)."""
    total = NormalEquationStats.empty(n_classes, method)
    for probs, labels in _chunks(shard, options, n_classes, chunk_rows):
        part = NormalEquationStats.from_chunk(
            probs,
            labels,
            method=method,
            params=params,
            class_weight_sq=class_weight_sq,
            n_classes=n_classes,
        )
        total = total.merge(part)
    return total


def shard_naive_stats(
    shard: Shard, *, options: ReadOptions, n_classes: int, chunk_rows: int = CHUNK_ROWS
) -> Counted:
    """The naive fit's single pass over one shard (counts and the unweighted system)."""
    counts = ClassCountStats.empty(n_classes)
    system = NormalEquationStats.empty(n_classes, "naive")
    renormalized = [0]
    for probs, labels in _chunks(shard, options, n_classes, chunk_rows, renormalized=renormalized):
        counts = counts.merge(ClassCountStats.from_chunk(probs, labels, n_classes))
        system = system.merge(
            NormalEquationStats.from_chunk(probs, labels, method="naive", n_classes=n_classes)
        )
    return Counted(FitStats(counts, system), renormalized[0])


def shard_eval_stats(
    shard: Shard,
    *,
    options: ReadOptions,
    n_classes: int,
    correction: Correction | None,
    h_name: str = "H",
    chunk_rows: int = CHUNK_ROWS,
) -> Counted:
    """Evaluate one shard: raw and corrected sums (None: raw only).

    An affine correction goes through :meth:`EvalStats.from_outputs` (only the
    rows below its gate are corrected); the other kinds correct every row.
    """
    from cnnbal.pipeline import check_finite_correction

    total, renormalized = EvalStats.empty(n_classes), [0]
    chunks = _chunks(
        shard, options, n_classes, chunk_rows, row_major=True, renormalized=renormalized
    )
    for probs, labels in chunks:
        if correction is None:
            part = EvalStats.from_chunk(probs, probs, labels, n_classes)
        elif correction.kind == "affine":
            part = EvalStats.from_outputs(probs, labels, correction.params["H"], correction.gate)
        else:
            corrected = correction.apply(probs)
            check_finite_correction(corrected, correction.kind, h_name)
            part = EvalStats.from_chunk(probs, corrected, labels, n_classes)
        total = total.merge(part)
    return Counted(total, renormalized[0])


def _run(engine: Engine | None, func, shards: Sequence[Shard], merge=merge_stats):
    if engine is None:
        return reduce(merge, (func(shard) for shard in shards))
    return engine.map_reduce(func, list(shards), merge)


# ------------------------------------------------------------------ fit


def fit_dataset(
    dataset,
    *,
    method: str = "elaborated",
    params: FitParams = DEFAULT_PARAMS,
    engine: Engine | None = None,
    chunk_rows: int = CHUNK_ROWS,
    options: ReadOptions | None = None,
    provenance: dict | None = None,
    report: dict | None = None,
) -> tuple[Artifact, tuple[str, ...]]:
    """Fit H on every shard of a dataset, streaming (docs/method.md sections 2-3).

    The elaborated fit reads the data twice: per-class counts, then the
    weighted normal equations (:mod:`cnnbal.stats`); the naive fit once.
    Memory holds one chunk and the (K+1)-square system, whatever the number
    of rows. A dataset with no more rows than classes (large K) is read whole
    instead: its rows take less memory than the system, and the in-memory fit
    has a faster route for it. H equals :func:`cnnbal.pipeline.fit_file`'s on
    the concatenated rows (to rounding, ~1e-15).

    Parameters
    ----------
    dataset : Dataset, path, or sequence of paths
        Paths (files, folders, globs) are opened with
        :func:`cnnbal.io.open_dataset` and ``options``.
    method : {"elaborated", "naive"}
    params : FitParams
    engine : Engine, optional
        Where the per-shard passes run (None: this process, shard after shard).
    chunk_rows : int
        Upper bound on rows per chunk (fewer for large K: :func:`stream_chunk_rows`).
    options : ReadOptions, optional
        Only for paths; a Dataset carries its own.
    provenance : dict, optional
        Recorded in the artifact.
    report : dict, optional
        Filled with ``rows_renormalized`` (rows ``--renormalize`` divided by
        their sum) for the caller's messages.

    Returns
    -------
    artifact : Artifact
        ``input_name`` is the dataset's label, ``input_sha256`` the file's
        SHA-256 for one local file, else the SHA-256 of ``"relpath:sha256"``
        lines of every shard.
    warnings : tuple of str
        The fit's notes (also in the CLI output).
    """
    from cnnbal.pipeline import check_params

    if method not in METHODS:
        raise CnnbalError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    check_params(params)
    dataset = _as_dataset(dataset, options)
    options = dataset.options
    n_classes = dataset.n_classes
    rows = stream_chunk_rows(n_classes, chunk_rows)
    with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", UserWarning)  # reported through result.warnings
        try:
            result, renormalized = _fit_passes(dataset, method, params, engine, rows)
        except OverflowError as exc:  # a huge --beta or --alpha, reported by the solver once
            raise CnnbalError(f"{dataset.label}: {exc}") from None
    if report is not None:
        report["rows_renormalized"] = renormalized
    if dataset.class_names is not None:
        from cnnbal.pipeline import named_class_notes

        result = dataclasses.replace(
            result, warnings=named_class_notes(result, dataset.class_names)
        )
    artifact = Artifact.from_fit(
        result,
        class_names=dataset.class_names,
        input_sha256=dataset_sha256(dataset),
        input_name=dataset.label,
        provenance=provenance,
    )
    return artifact, result.warnings


def _fit_passes(dataset, method: str, params: FitParams, engine, rows: int):
    """The streamed passes of :func:`fit_dataset`: (FitResult, rows renormalized)."""
    options = dataset.options
    n_classes = dataset.n_classes
    n_rows = dataset.n_rows
    if n_rows is not None and n_rows <= n_classes:
        result, renormalized = _fit_in_memory(dataset, method, params, rows)
    elif method == "naive":
        worker = partial(shard_naive_stats, options=options, n_classes=n_classes, chunk_rows=rows)
        counted = _run(engine, worker, dataset.shards)
        result, renormalized = counted.stats.finish(), counted.n_renormalized
    else:
        counted = _run(
            engine,
            partial(shard_class_counts, options=options, n_classes=n_classes, chunk_rows=rows),
            dataset.shards,
        )
        counts, renormalized = counted.stats, counted.n_renormalized
        worker = partial(
            shard_fit_system,
            options=options,
            n_classes=n_classes,
            method=method,
            params=params,
            class_weight_sq=counts.class_weight_sq(params),
            chunk_rows=rows,
        )
        system = _run(engine, worker, dataset.shards)
        result = FitStats(counts, system).finish(params)
    return result, renormalized


def _fit_in_memory(dataset: Dataset, method: str, params: FitParams, chunk_rows: int):
    probs, labels, renormalized = [], [], [0]
    for shard in dataset.shards:
        chunks = _chunks(
            shard, dataset.options, dataset.n_classes, chunk_rows, renormalized=renormalized
        )
        for p, y in chunks:
            probs.append(p)
            labels.append(y)
    result = fit(
        np.concatenate(probs), np.concatenate(labels), method, params, n_classes=dataset.n_classes
    )
    return result, renormalized[0]


def dataset_sha256(dataset: Dataset) -> str:
    """What an artifact records as its input's SHA-256 (see :func:`fit_dataset`)."""
    shards = dataset.shards
    if len(shards) == 1 and shards[0].filesystem is None:
        return file_sha256(shards[0].location)
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"{shard.relpath}:{_shard_sha256(shard)}\n".encode())
    return digest.hexdigest()


def _shard_sha256(shard: Shard) -> str:
    if shard.filesystem is None:
        return file_sha256(shard.location)
    digest = hashlib.sha256()
    with shard.filesystem.open_input_stream(shard.location) as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ evaluate


def evaluate_dataset(
    dataset,
    artifact: Artifact | None = None,
    *,
    engine: Engine | None = None,
    chunk_rows: int = CHUNK_ROWS,
    options: ReadOptions | None = None,
    h_name: str = "H",
    report: dict | None = None,
) -> Comparison:
    """Raw vs corrected metrics over every shard, streaming (raw vs raw without H).

    Each shard yields an :class:`~cnnbal.stats.EvalStats` (confusion matrices,
    exact squared-error sums, changed counts); their sum gives every metric,
    equal to :func:`cnnbal.pipeline.evaluate_file` on the concatenated rows.

    Parameters
    ----------
    dataset : Dataset, path, or sequence of paths
    artifact : Artifact, optional
        The H to evaluate; its class count (and names, when both are known)
        must match the dataset's.
    engine : Engine, optional
    chunk_rows : int
    options : ReadOptions, optional
        Only for paths.
    h_name : str
        How messages name the artifact.
    report : dict, optional
        Filled with ``rows_renormalized``.

    Returns
    -------
    Comparison
    """
    from cnnbal.pipeline import check_compatible

    dataset = _as_dataset(dataset, options)
    n_classes = dataset.n_classes
    correction, val_accuracy = None, None
    if artifact is not None:
        named = SimpleNamespace(name=dataset.label)  # check_compatible names it by .name
        check_compatible(artifact, n_classes, dataset.class_names, named, h_name)
        correction, val_accuracy = artifact.correction, artifact.val_class_accuracy
    worker = partial(
        shard_eval_stats,
        options=dataset.options,
        n_classes=n_classes,
        correction=correction,
        h_name=h_name,
        chunk_rows=stream_chunk_rows(n_classes, chunk_rows),
    )
    counted = _run(engine, worker, dataset.shards)
    if report is not None:
        report["rows_renormalized"] = counted.n_renormalized
    return counted.stats.finish(val_class_accuracy=val_accuracy)
