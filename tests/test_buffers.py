"""Reused work arrays: memory comes back only when nothing refers to it."""

from __future__ import annotations

import threading

import numpy as np

from cnnbal import _buffers

SHAPE = (100, 20_000)  # 8 MB of float32: above MIN_BYTES


def address(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


def test_memory_of_a_dropped_array_is_reused_inside_reuse():
    with _buffers.reuse():
        first = _buffers.empty(SHAPE, np.float32)
        where = address(first)
        del first
        second = _buffers.empty(SHAPE, np.float32)
        assert address(second) == where
        assert second.shape == SHAPE and second.dtype == np.float32
        assert second.flags.c_contiguous and second.flags.writeable


def test_an_array_or_any_view_of_it_keeps_its_memory_out_of_the_pool():
    with _buffers.reuse():
        first = _buffers.empty(SHAPE, np.float32)
        first[:] = 7
        column = first.T[:, 3]  # a view: the caller still holds the memory
        del first
        second = _buffers.empty(SHAPE, np.float32)
        second[:] = -1
        assert np.all(column == 7)  # not handed out again while the view lives
        where = address(column)
        del column
        third = _buffers.empty(SHAPE, np.float32)
        assert address(third) <= where < address(third) + third.nbytes


def test_outside_reuse_and_for_small_arrays_it_is_np_empty():
    first = _buffers.empty(SHAPE, np.float32)
    where = address(first)
    kept = first  # noqa: F841 - alive: a fresh allocation cannot be at the same place
    assert address(_buffers.empty(SHAPE, np.float32)) != where
    with _buffers.reuse():
        small = _buffers.empty((10, 10), np.float64)
        assert small.base is None  # numpy's own
    assert _buffers._kept == []


def test_a_smaller_request_may_use_a_larger_free_block_and_other_dtypes():
    with _buffers.reuse():
        big = _buffers.empty(SHAPE, np.float32)
        where = address(big)
        del big
        larger = _buffers.empty((100, 15_000), np.float64)  # 12 MB: does not fit in 8
        assert address(larger) != where
        del larger
        part = _buffers.empty((100, 12_000), np.float32)  # 4.8 MB fits in 8 MB, > half
        assert address(part) == where
    assert _buffers._kept == []


def test_threads_never_get_the_same_memory_at_once():
    import time

    errors = []

    def work(tag):
        for _ in range(30):
            arr = _buffers.empty(SHAPE, np.float32)
            arr.fill(tag)
            time.sleep(0.001)  # let the other threads allocate meanwhile
            if not (arr[0, 0] == tag and arr[-1, -1] == tag and np.all(arr[::37] == tag)):
                errors.append(tag)
            del arr

    with _buffers.reuse():
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
