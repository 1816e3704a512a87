"""Reading ahead and writing behind a computation, in order, with bounded memory.

Streaming a file is three steps a block: read (decode, validate), compute,
write. The file steps release the GIL (pyarrow decoding and encoding, file
I/O, most of numpy), so a reader thread and a writer thread let them run
while the main thread computes, when the process has the cores for it
(:func:`overlap_depth`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading

__all__ = ["OVERLAP_DEPTH", "TABLE_SUFFIXES", "Overlap", "one_blas_thread", "overlap_depth"]

#: Blocks the reader may run ahead of, and the writer behind, the computation.
OVERLAP_DEPTH = 2
#: Inputs read ahead on a thread (decoded tables); arrays are read in turn.
TABLE_SUFFIXES = (".parquet", ".pq", ".csv")


def overlap_depth() -> int:
    """:data:`OVERLAP_DEPTH` when this process has 2 cores or more of its own, else 0.

    The reader and writer threads pay off when they have a core to run on; a
    worker process with one core's share runs the steps in turn (its sibling
    processes keep the other cores busy) and spends less CPU time on handoffs.
    """
    from cnnbal.engine import own_cores

    return OVERLAP_DEPTH if own_cores() >= 2 else 0


@contextlib.contextmanager
def one_blas_thread():
    """One BLAS thread while blocks are computed beside a reader (and writer) thread.

    The products are small (a block of rows times W) and run beside the
    reader and writer threads: a second BLAS thread gains nothing there, and
    OpenBLAS's idle threads spin on the cores the parquet threads need (on 2
    cores, ``apply --jobs 1`` took 11.7 s of CPU time for 7.1 s of wall time).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


class Overlap:
    """Reads the next blocks and writes the last ones while this one is corrected.

    One reader and one writer thread, shared by every Overlap of the process
    (:func:`_threads`; parquet decoding, encoding and file I/O release the
    GIL), each at most ``depth`` blocks ahead or behind: the file
    I/O overlaps the arithmetic, memory stays bounded (``2 * depth + 1``
    blocks), and blocks are read, corrected and written in order, so the
    output bytes are the same as a sequential loop.
    """

    _END = object()

    def __init__(self, depth: int = OVERLAP_DEPTH, *, read_ahead: bool = True):
        self.depth = depth
        # a memory-mapped source releases each block's pages when asked for the
        # next one: read ahead, it would drop pages the computation still reads,
        # which come back resident and stay (an 800 MB .npy: 1.1 GB instead of 0.4)
        self.reads_ahead = read_ahead and depth > 0

    def __enter__(self):
        self._pending: collections.deque = collections.deque()
        if self.depth == 0:  # no threads: read, correct and write in turn
            self._reader = self._writer = _InlineExecutor()
            return self
        self._reader, self._writer = _threads()
        return self

    def __exit__(self, *exc):
        # the threads are shared: cancel and wait for this object's own work only
        pending, self._pending = list(self._pending), collections.deque()
        _cancel_and_wait(pending)

    def read_ahead(self, chunks):
        if not self.reads_ahead:
            yield from chunks
            return
        iterator = iter(chunks)
        ahead = collections.deque(
            self._reader.submit(next, iterator, self._END) for _ in range(max(self.depth, 1))
        )
        try:
            while True:
                chunk = ahead.popleft().result()  # re-raises the reader's error here
                if chunk is self._END:
                    return
                ahead.append(self._reader.submit(next, iterator, self._END))
                yield chunk
        finally:
            # stopped early (an error, a consumer that breaks off): no read of this
            # iterator may still be running when its owner closes it
            _cancel_and_wait(ahead)

    def write_behind(self, write, *args) -> None:
        while self._pending and len(self._pending) >= self.depth:  # order kept, memory bounded
            self._pending.popleft().result()
        self._pending.append(self._writer.submit(write, *args))

    def drain(self, *, raise_errors: bool = True) -> None:
        pending, self._pending = list(self._pending), collections.deque()
        if raise_errors:
            for future in pending:
                future.result()
        else:
            from concurrent.futures import wait

            wait(pending)


_threads_lock = threading.Lock()
_shared: tuple | None = None


def _threads():
    """The process's reader and writer threads, made once and shared by every Overlap.

    New threads for every shard (fit and evaluate open an Overlap per shard)
    made glibc give each its own heap arena: peak RSS then grew with the number
    of shards (evaluate: 391 MiB at 16 shards, 464 MiB at 64).
    """
    global _shared
    with _threads_lock:
        if _shared is None:
            from concurrent.futures import ThreadPoolExecutor

            _shared = (
                ThreadPoolExecutor(1, thread_name_prefix="cnnbal-read"),
                ThreadPoolExecutor(1, thread_name_prefix="cnnbal-write"),
            )
        return _shared


def _forget_threads() -> None:
    """In a forked child the parent's threads do not exist: make new ones on demand."""
    global _shared, _threads_lock
    _shared = None
    _threads_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads)


def _cancel_and_wait(futures) -> None:
    """Cancel what has not started; wait for what has (its result is dropped)."""
    from concurrent.futures import wait

    running = [future for future in futures if not future.cancel()]
    wait(running)


class _InlineExecutor:
    """``submit`` runs the call at once (for :class:`Overlap` without threads)."""

    def submit(self, func, *args):
        from concurrent.futures import Future

        future = Future()
        try:
            future.set_result(func(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def shutdown(self, **_) -> None:
        pass
