"""Packing sample lengths into rows of seq_length: the C++ packer, its Python reference, and rows.

best-fit-decreasing (BFD): items longest first (ties: lower index first); each goes to the open bin
with the least room that still fits it (ties: the lowest bin index), else to a new bin. The C++
packer (csrc/packing.cpp) and `best_fit_decreasing_reference` make exactly the same choices; the
tests compare them item by item. `next_fit_reference` is the one-pass baseline of the benchmark.
"""

from __future__ import annotations

import bisect
import heapq

import numpy as np

from mftcore import _packing


def best_fit_decreasing(lengths, capacity: int) -> np.ndarray:
    """Bin index of each item (C++); bins are numbered in the order they are opened."""
    return _packing.best_fit_decreasing(np.asarray(lengths, dtype=np.int64), int(capacity))


def check_lengths(lengths: list, capacity: int) -> None:
    for i, x in enumerate(lengths):
        if not 1 <= x <= capacity:
            raise ValueError(f"length {x} at index {i} is outside [1, capacity={capacity}]")


def best_fit_decreasing_reference(lengths, capacity: int) -> np.ndarray:
    """Plain-Python BFD with the C++ tie-breaking: the test oracle and the benchmark baseline.

    Rooms are integers, so the open bins are kept as a sorted list of the distinct room values
    (at most capacity+1 of them, searched with bisect) and one min-heap of bin indices per room.
    A room below the shortest item can never be used again and is not kept (as in C++).
    """
    lengths = [int(x) for x in lengths]
    check_lengths(lengths, capacity)
    shortest = min(lengths, default=capacity)
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)  # stable: ties by index
    rooms, heaps = [], {}  # sorted non-empty room values; room -> heap of bin indices
    bins, num_bins = [0] * len(lengths), 0
    for i in order:
        x = lengths[i]
        k = bisect.bisect_left(rooms, x)
        if k == len(rooms):
            b, left = num_bins, capacity - x
            num_bins += 1
        else:
            room = rooms[k]
            heap = heaps[room]
            b = heapq.heappop(heap)
            if not heap:
                del rooms[k], heaps[room]
            left = room - x
        bins[i] = b
        if left >= shortest:
            heap = heaps.get(left)
            if heap is None:
                bisect.insort(rooms, left)
                heaps[left] = [b]
            else:
                heapq.heappush(heap, b)
    return np.asarray(bins, dtype=np.int64)


def next_fit_reference(lengths, capacity: int) -> np.ndarray:
    """Plain-Python next-fit: items in order, a new bin whenever the current one is too full."""
    lengths = [int(x) for x in lengths]
    check_lengths(lengths, capacity)
    bins, b, room = [], -1, 0
    for x in lengths:
        if x > room:
            b, room = b + 1, capacity
        room -= x
        bins.append(b)
    return np.asarray(bins, dtype=np.int64)


def rows_from_bins(bins: np.ndarray) -> list:
    """Item indices of each bin, in bin order; inside a bin, items keep their input order."""
    bins = np.asarray(bins, dtype=np.int64)
    if len(bins) == 0:
        return []
    order = np.argsort(bins, kind="stable")
    counts = np.bincount(bins)
    return np.split(order, np.cumsum(counts)[:-1])


def fill_ratio(lengths, bins, capacity: int) -> float:
    """Tokens over the capacity of the bins used (1.0 = no padding at all)."""
    bins = np.asarray(bins)
    return float(np.sum(lengths)) / (capacity * (int(bins.max()) + 1)) if len(bins) else 1.0
