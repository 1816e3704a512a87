"""Cache-blocked kernels behind :func:`cnnbal.core.apply_correction` (pure numpy).

Correcting outputs with H is one matrix product and a handful of passes over
the result: add the bias, clip at 0, sum each row, divide, put back the rows
at or above the gate, and (for ``apply``) the argmax of each row. Run on a
whole block of 65,536 rows x 100 classes, every pass streams 26 MB through
memory; run on slices of a few thousand rows, the slice stays in the L2 cache
from the product to the copy-out, and the passes cost a fraction. The result
is the same row by row (each row's correction depends on that row alone).

Blocks are worked on class-major, shape (n_classes, rows): a column-major
input (one contiguous array per class, as read from a table of K columns)
is sliced without a copy, and every pass runs along contiguous memory. A
row-major input (``.npy``) is multiplied in transposed form by BLAS and
copied out transposed.

Rows at or above the gate are returned bit for bit. When few rows of a block
are below the gate (a confident model), only those rows are multiplied.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from cnnbal import _buffers

__all__ = ["AffineResult", "affine_blocks", "first_argmax_classmajor"]

#: About 1 MiB of float32 a block: a block, its result and the scratch arrays
#: fit in a 2 MiB L2 cache. Measured on 65,536 x 100 float32 (2 cores, AVX-512):
#: 2,048-8,192 rows all within 5% of each other, 512 rows 25% slower.
BLOCK_VALUES = 1 << 18
#: Fewest rows a block: below this the per-call overhead of numpy dominates.
MIN_BLOCK_ROWS = 256
#: Above this many classes the whole array is corrected at once: the product
#: dominates, and one large product is what BLAS does best (K = 1,000: blocks
#: took 1.08-1.12x the time of the whole array; K = 300: even).
MAX_BLOCKED_CLASSES = 256


@dataclass(frozen=True)
class AffineResult:
    """What :func:`affine_blocks` returns.

    Attributes
    ----------
    corrected : ndarray of shape (n_samples, n_classes)
        The memory layout of the input.
    pred : ndarray of shape (n_samples,), int64, or None
        ``corrected.argmax(axis=1)`` (first maximum wins), when asked for.
    first_nonfinite : int or None
        The first row whose corrected scores are not all finite (a corrupt H);
        None when every row is finite. ``pred`` is meaningless on such a row.
    """

    corrected: np.ndarray
    pred: np.ndarray | None
    first_nonfinite: int | None


def affine_blocks(
    W: np.ndarray,
    b: np.ndarray,
    probs: np.ndarray,
    gate: float,
    *,
    clip: bool,
    row_max: np.ndarray | None,
    predict: bool,
    block_rows: int | None = None,
) -> AffineResult:
    """``W p + b`` row by row (clipped and renormalised with ``clip``); rows whose maximum
    is at or above ``gate`` unchanged.

    ``W``, ``b`` and ``probs`` share one float dtype (the caller casts).
    ``block_rows`` overrides the block size (tests).
    """
    n, k = probs.shape
    gated = bool(np.isfinite(gate))
    if gated and row_max is None:
        row_max = probs.max(axis=1)
    if block_rows is None:
        block_rows = max(MIN_BLOCK_ROWS, BLOCK_VALUES // max(k, 1))
    column_major = probs.flags.f_contiguous and not probs.flags.c_contiguous
    src = probs.T  # (k, n): C-contiguous for a column-major input
    if column_major:
        out_cm = _buffers.empty((k, n), probs.dtype)
        out = out_cm.T
    else:
        out = _buffers.empty((n, k), probs.dtype)
        out_cm = out.T
    pred = np.empty(n, dtype=np.int64) if predict else None
    width = min(block_rows, n)
    scratch = _scratch(k, width, probs.dtype, b, predict)
    # overflow and inf * 0 are reported in the result (first_nonfinite), not warned
    with np.errstate(over="ignore", invalid="ignore"):
        first_bad = _blocks(
            W, probs, src, out_cm, pred, gate, gated, row_max, block_rows, scratch, clip
        )
    return AffineResult(out, pred, first_bad)


def _blocks(W, probs, src, out_cm, pred, gate, gated, row_max, block_rows, scratch, clip):
    n, k = probs.shape
    first_bad: int | None = None
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        m = stop - start
        block = src[:, start:stop]
        buf = scratch.values[:, :m]
        below = None if not gated else row_max[start:stop] < gate
        n_below = m if below is None else int(np.count_nonzero(below))
        if n_below == m:
            bad = _correct_into(W, block, buf, scratch, clip, None)
        elif n_below == 0:
            np.copyto(buf, block)
            bad = None
        elif 4 * n_below < m:
            # few rows to correct (a confident model): multiply only those
            rows = np.flatnonzero(below)
            np.copyto(buf, block)
            part = np.empty((k, rows.size), dtype=probs.dtype)
            bad = _correct_into(W, block[:, rows], part, scratch, clip, None)
            buf[:, rows] = part
            if bad is not None:
                bad = int(rows[bad])
        elif 8 * n_below > 7 * m:
            # few rows to keep: put them back one column each
            bad = _correct_into(W, block, buf, scratch, clip, None)
            rows = np.flatnonzero(~below)
            buf[:, rows] = block[:, rows]
        else:
            bad = _correct_into(W, block, buf, scratch, clip, ~below)
        if bad is not None and first_bad is None:
            first_bad = start + bad
        if pred is not None:
            pred[start:stop] = first_argmax_classmajor(buf, scratch)
        out_cm[:, start:stop] = buf
    return first_bad


_LOCAL = threading.local()


def _scratch(k: int, width: int, dtype, b: np.ndarray, predict: bool) -> _Scratch:
    """This thread's work arrays, kept from the last call of the same shape.

    Fresh arrays of a few MiB cost more to fault in (the kernel zeroes every
    page) than the arithmetic done in them: apply makes a call per block of
    65,536 rows, and a new set each time doubled the page faults of a run.
    """
    key = (k, width, np.dtype(dtype), predict)
    cached = getattr(_LOCAL, "scratch", None)
    if cached is None or cached.key != key:
        cached = _Scratch(k, width, dtype, predict)
        cached.key = key
        _LOCAL.scratch = cached
    cached.bias[...] = b.astype(dtype)[:, None]
    return cached


class _Scratch:
    """Work arrays reused by every block (each at most one block wide).

    Full-width operands instead of broadcast ones: numpy's element-wise loops
    run up to 2x faster on two arrays of one shape than on a (k, 1) column
    or a scalar spread over a block.
    """

    def __init__(self, k: int, width: int, dtype, predict: bool):
        self.values = np.empty((k, width), dtype=dtype)
        self.other = np.empty((k, width), dtype=dtype)
        self.sums = np.empty(width, dtype=dtype)
        self.bias = np.empty((k, width), dtype=dtype)
        self.zeros = np.zeros((k, width), dtype=dtype)
        if predict:
            self.equal = np.empty((k, width), dtype=bool)
            weight_type = np.uint8 if k < 256 else np.uint16 if k < 65536 else np.uint32
            self.weights = np.repeat(np.arange(k, 0, -1, dtype=weight_type)[:, None], width, axis=1)
            self.weighted = np.empty((k, width), dtype=weight_type)
            self.best = np.empty(width, dtype=dtype)


def _correct_into(W, block, buf, scratch: _Scratch, clip: bool, keep) -> int | None:
    """``buf = W @ block + b`` (clipped and renormalised with ``clip``), class-major.

    ``keep``: a boolean mask of the columns (rows of the data) to return as
    they are in ``block`` instead, or None. Returns the first column with a
    non-finite result (kept or not: a corrupt H), or None.
    """
    m = buf.shape[1]
    np.matmul(W, block, out=buf)
    np.add(buf, scratch.bias[:, :m], out=buf)
    if clip:
        np.maximum(buf, scratch.zeros[:, :m], out=buf)
    # the column sums double as the finiteness check: a NaN or inf anywhere in a
    # column makes its sum non-finite (after the clip no -inf is left to cancel
    # +inf; without it, +inf and -inf sum to NaN)
    sums = np.add.reduce(buf, axis=0, out=scratch.sums[:m])
    finite = np.isfinite(sums)
    bad = None if finite.all() else int(np.flatnonzero(~finite)[0])
    if not clip and keep is None:
        return bad
    # one multiplication renormalises and zeroes the kept columns
    scale = np.ones(m, dtype=buf.dtype)
    if clip:
        # a column of all non-positive scores cannot happen for rows summing to
        # 1; it is left as it is (zeros) anyway, and so is a non-finite one
        usable = finite & (sums > 0)
        np.divide(scale, sums, out=scale, where=usable)
    if keep is not None:
        scale[keep] = 0
    np.multiply(buf, scale, out=buf)
    if keep is not None:
        # x * 0 + p * 1 and x * s + p * 0 are exact: the kept columns come back
        # bit for bit (a finite x; a non-finite one is reported as bad)
        kept = np.multiply(block, keep.astype(buf.dtype), out=scratch.other[:, :m])
        np.add(buf, kept, out=buf)
    return bad


def first_argmax_classmajor(values: np.ndarray, scratch: _Scratch | None = None) -> np.ndarray:
    """``values.argmax(axis=0)`` (first maximum wins) of a class-major block (k, m).

    numpy's argmax along the first axis copies the block transposed; here the
    column maxima are a reduction along contiguous rows, and the first class
    reaching it is found as the largest of ``(values == max) * (k - class)``,
    all in whole-block passes. Finite values only.
    """
    k, m = values.shape
    if scratch is None:
        scratch = _scratch(k, m, values.dtype, np.zeros(k, values.dtype), True)
    best = np.max(values, axis=0, out=scratch.best[:m])
    equal = np.equal(values, best, out=scratch.equal[:, :m])
    weighted = np.multiply(equal, scratch.weights[:, :m], out=scratch.weighted[:, :m])
    top = weighted.max(axis=0)
    return k - top.astype(np.int64)
