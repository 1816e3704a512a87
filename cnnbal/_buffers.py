"""Reuse of large work arrays between blocks (pure numpy, no I/O).

Streaming a file allocates the same few arrays for every block of 65,536
rows: the score matrix read from K columns, the corrected matrix. An array
that large is mapped fresh by the allocator each time, and every page of it
is faulted in and zeroed by the kernel: on 16 shards x 250,000 x 100 float32
that was a third of ``apply``'s system time.

Inside ``with reuse():`` (``apply`` holds it for a run), :func:`empty` hands
out arrays from memory that an earlier block used, once nothing refers to
that memory any more: its reference count says so, so a caller that keeps a
block, or any view of it, keeps its memory out of the pool. Outside, and for
arrays below :data:`MIN_BYTES`, :func:`empty` is ``np.empty``. The pool is
emptied when the last ``reuse()`` ends: nothing is held at rest.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np

__all__ = ["empty", "reuse"]

#: Smaller arrays are cheap to allocate: numpy's own cache and the heap serve them.
MIN_BYTES = 4 << 20
#: Blocks of memory the pool keeps track of (in use or free).
MAX_KEPT = 8

_lock = threading.Lock()
_kept: list[np.ndarray] = []  # 1-D uint8 arrays, owned by this module
_users = 0


def _free_count() -> int:
    """``sys.getrefcount`` of a kept block that nothing else refers to, read as in
    :func:`_take` (the exact count differs between Python versions)."""
    probe = [np.empty(1, dtype=np.uint8)]
    for i in range(len(probe)):
        block = probe[i]
        return sys.getrefcount(block)
    raise AssertionError  # pragma: no cover


_FREE = _free_count()


@contextlib.contextmanager
def reuse():
    """Let :func:`empty` reuse memory until the last ``reuse()`` ends (thread-safe)."""
    global _users
    with _lock:
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _kept.clear()


def empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` (C order), from reused memory inside :func:`reuse`."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < MIN_BYTES or not _users:
        return np.empty(shape, dtype=dtype)
    with _lock:
        block = _take(nbytes)
    return block[:nbytes].view(dtype).reshape(shape)


def _take(nbytes: int) -> np.ndarray:
    for i in range(len(_kept)):
        block = _kept[i]
        # only this list refers to it: every array handed out of it, and every
        # view of those, has been dropped
        if sys.getrefcount(block) == _FREE and nbytes <= block.nbytes <= 2 * nbytes:
            _kept.append(_kept.pop(i))  # most recently used last
            return block
    block = np.empty(nbytes, dtype=np.uint8)
    _kept.append(block)
    if len(_kept) > MAX_KEPT:
        # forget the least recently used free block; if none is free, the
        # oldest (its users keep it alive; it is just no longer offered)
        drop = 0
        for i in range(len(_kept) - 1):
            old = _kept[i]
            if sys.getrefcount(old) == _FREE:
                drop = i
                break
        del _kept[drop]
    return block
