"""Engines: where the per-shard functions run (this process, local processes, a Dask cluster).

An engine only schedules. It calls pure, picklable per-shard functions (a
module-level function or a :func:`functools.partial` of one) and merges their
results with the ``merge`` it is given; the method itself lives in
:mod:`cnnbal.core` and :mod:`cnnbal.stats`, never here::

    from functools import partial
    from cnnbal.engine import make_engine

    with make_engine("local", jobs=4) as engine:     # or make_engine("dask", scheduler="tcp://...")
        reports = engine.map(partial(apply_shard, plan), shards)
        stats = engine.map_reduce(partial(count_shard, options), shards, merge)

The local engine runs in this process for ``jobs=1`` and otherwise in a pool
of spawned processes (spawn, not fork: safe with threads and on every
platform). The Dask engine connects to a running scheduler, or starts a
``LocalCluster`` for the run and closes it afterwards; Dask is imported only
there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from cnnbal.errors import CnnbalError

__all__ = [
    "ENGINES",
    "DaskEngine",
    "Engine",
    "LocalEngine",
    "default_apply_jobs",
    "default_jobs",
    "make_engine",
    "own_cores",
]

ENGINES = ("local", "dask")
#: How long to wait for a Dask scheduler to answer (a busy cluster answers in well under this).
CONNECT_TIMEOUT = "10s"


def default_jobs() -> int:
    """The number of cores this process may use (the default of ``--jobs``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_apply_jobs() -> int:
    """``apply``'s default ``--jobs``: half the cores, at least 1.

    One apply process keeps about two cores busy (a reader and a writer
    thread beside the correction, :func:`cnnbal.pipeline.apply_dataset`): on
    2 cores, 2 processes took 1.17x the time of 1.
    """
    return max(1, default_jobs() // 2)


class Engine:
    """What every engine offers: ordered ``map`` and a tree ``map_reduce``."""

    #: how many shards run at once (informational: progress, thread limits)
    workers: int = 1

    def map(
        self,
        func: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list:
        """``[func(item) for item in items]``, possibly in parallel.

        Parameters
        ----------
        func : callable
            Pure and picklable.
        items : sequence
        on_result : callable, optional
            Called in this process as ``on_result(index, result)`` when each
            item finishes (in completion order): progress bars.

        Returns
        -------
        list
            Results in the order of ``items``. The first failure is raised
            after the work already started has been cancelled.
        """
        raise NotImplementedError

    def map_reduce(
        self,
        func: Callable[[Any], Any],
        items: Sequence[Any],
        merge: Callable[[Any, Any], Any],
    ) -> Any:
        """``merge`` over ``func(item)`` for every item, as a balanced tree.

        ``merge`` must be associative and commutative (mergeable statistics:
        plain sums), so the order of the tree does not change the result
        beyond floating-point rounding; the local engine merges in item order.
        """
        if not items:
            raise ValueError("map_reduce needs at least one item")
        results = self.map(func, items)
        return _tree_merge(results, merge)

    def close(self) -> None:
        """Release processes and clusters."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _tree_merge(values: list, merge: Callable[[Any, Any], Any]) -> Any:
    """Pairwise merge, level by level (the same tree shape on every engine)."""
    while len(values) > 1:
        merged = [merge(values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)]
        if len(values) % 2:
            merged.append(values[-1])
        values = merged
    return values[0]


class LocalEngine(Engine):
    """Shards in this process (``jobs=1``) or in a pool of ``jobs`` spawned processes.

    Each worker process limits its BLAS/OpenMP threads to its share of the
    cores, so ``jobs`` processes do not oversubscribe the machine.
    """

    def __init__(self, jobs: int | None = None):
        jobs = default_jobs() if jobs is None else jobs
        if jobs < 1:
            raise CnnbalError(f"--jobs must be at least 1, got {jobs}")
        self.workers = jobs
        self._pool = None

    def _executor(self, n_items: int):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, default_jobs() // self.workers)
            self._pool = ProcessPoolExecutor(
                max_workers=min(self.workers, max(n_items, 1)),
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_limit_threads,
                initargs=(threads,),
            )
        return self._pool

    def map(self, func, items, *, on_result=None):
        items = list(items)
        if self.workers == 1 or len(items) <= 1:
            results = []
            for i, item in enumerate(items):
                results.append(func(item))
                if on_result is not None:
                    on_result(i, results[-1])
            return results
        from concurrent.futures import FIRST_EXCEPTION, wait

        pool = self._executor(len(items))
        futures = {pool.submit(func, item): i for i, item in enumerate(items)}
        results: list = [None] * len(items)
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    index = futures[future]
                    results[index] = future.result()  # re-raises a worker's error here
                    if on_result is not None:
                        on_result(index, results[index])
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


#: In a worker process of :class:`LocalEngine`: the cores it may use (its share).
_worker_cores: int | None = None


def own_cores() -> int:
    """The cores this process may use: a worker's share, else every core it may run on."""
    return _worker_cores if _worker_cores is not None else default_jobs()


def _limit_threads(threads: int) -> None:
    """Worker initializer: BLAS and OpenMP pools sized to this worker's share of cores."""
    global _worker_cores
    _worker_cores = threads
    try:
        import pyarrow
        from threadpoolctl import threadpool_limits

        # kept referenced: the limit lasts as long as the object lives
        _limit_threads.limiter = threadpool_limits(limits=threads)
        pyarrow.set_cpu_count(threads)  # parquet decoding threads
    except Exception:  # never let an optional speed setting stop the work
        pass


class DaskEngine(Engine):
    """Shards as tasks on a Dask distributed cluster.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``); default: the
        ``DASK_SCHEDULER_ADDRESS`` environment variable, else a
        ``LocalCluster`` of ``jobs`` single-threaded worker processes started
        now and closed by :meth:`close`.
    jobs : int, optional
        Worker processes of the LocalCluster (default: the number of cores).

    Every worker must be able to import the same cnnbal version and read the
    shards' paths (a shared filesystem or object storage).
    """

    def __init__(self, scheduler: str | None = None, jobs: int | None = None):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise CnnbalError("--engine dask needs Dask: pip install 'cnnbal[dask]'") from None
        scheduler = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        self._cluster = None
        if scheduler is None:
            n_workers = default_jobs() if jobs is None else jobs
            if n_workers < 1:
                raise CnnbalError(f"--jobs must be at least 1, got {n_workers}")
            self._cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
            )
            self.client = Client(self._cluster)
            # each worker process gets its share of the cores, as LocalEngine's do
            threads = max(1, default_jobs() // n_workers)
            try:
                self.client.run(_limit_threads, threads)
            except Exception:  # an optional speed setting never stops the work
                pass
        else:
            try:
                self.client = Client(scheduler, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                raise CnnbalError(
                    f"{scheduler}: cannot connect to the Dask scheduler ({exc})"
                ) from None
        self.workers = max(1, len(self.client.scheduler_info().get("workers", {})))

    def map(self, func, items, *, on_result=None):
        from dask.distributed import as_completed

        items = list(items)
        if not items:
            return []
        # pure=False: a re-run must recompute (the files may have changed)
        futures = self.client.map(func, items, pure=False)
        index = {future.key: i for i, future in enumerate(futures)}
        results: list = [None] * len(items)
        try:
            for future in as_completed(futures):
                i = index[future.key]
                results[i] = future.result()
                if on_result is not None:
                    on_result(i, results[i])
        except BaseException:
            self.client.cancel(futures)
            raise
        return results

    def map_reduce(self, func, items, merge):
        """Per-shard results merged on the cluster, pairwise: only the root comes back."""
        items = list(items)
        if not items:
            raise ValueError("map_reduce needs at least one item")
        level = self.client.map(func, items, pure=False)
        try:
            while len(level) > 1:
                merged = [
                    self.client.submit(merge, level[i], level[i + 1], pure=False)
                    for i in range(0, len(level) - 1, 2)
                ]
                if len(level) % 2:
                    merged.append(level[-1])
                level = merged
            return level[0].result()
        except BaseException:
            self.client.cancel(level)
            raise

    def close(self) -> None:
        client, cluster = getattr(self, "client", None), self._cluster
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def make_engine(name: str = "local", *, jobs: int | None = None, scheduler: str | None = None):
    """The engine for ``--engine NAME`` (``local`` or ``dask``).

    Parameters
    ----------
    name : str
    jobs : int, optional
        Local: parallel processes (1 = this process). Dask LocalCluster: workers.
    scheduler : str, optional
        Dask only: a running scheduler's address.
    """
    if name == "local":
        if scheduler:
            raise CnnbalError("--scheduler needs --engine dask")
        return LocalEngine(jobs)
    if name == "dask":
        return DaskEngine(scheduler, jobs)
    raise CnnbalError(f"--engine must be one of {', '.join(ENGINES)}, got {name!r}")
