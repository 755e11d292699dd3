"""Packing sample lengths into rows of seq_length: the C++ packer and its Python reference."""

from __future__ import annotations

import numpy as np

from mftcore import _packing


def best_fit_decreasing(lengths, capacity: int) -> np.ndarray:
    """Bin index of each item (C++, O(n log n)); see csrc/packing.cpp for the exact tie-breaking."""
    return _packing.best_fit_decreasing(np.asarray(lengths, dtype=np.int64), int(capacity))


def best_fit_decreasing_reference(lengths, capacity: int) -> np.ndarray:
    """Plain-Python best-fit-decreasing with the same tie-breaking as the C++ packer (the test oracle)."""
    lengths = [int(x) for x in lengths]
    for i, x in enumerate(lengths):
        if not 1 <= x <= capacity:
            raise ValueError(f"length {x} at index {i} is outside [1, capacity={capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rooms, bins = [], [0] * len(lengths)
    for i in order:
        fits = [b for b, room in enumerate(rooms) if room >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (rooms[b], b))
        else:
            b = len(rooms)
            rooms.append(capacity)
        rooms[b] -= lengths[i]
        bins[i] = b
    return np.asarray(bins, dtype=np.int64)
