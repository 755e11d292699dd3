"""The C++ packer (mftcore._packing) against its Python reference (its speed and fill gates: test_gates.py)."""

import numpy as np
import pytest

from mftcore.data.packing import (
    best_fit_decreasing,
    best_fit_decreasing_reference,
    fill_ratio,
    next_fit_reference,
    rows_from_bins,
)


@pytest.mark.parametrize("seed", range(5))
def test_cpp_equals_reference(seed):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(4.5, 1.0, size=int(rng.integers(1, 400))).astype(np.int64), 1, 512)
    got, ref = best_fit_decreasing(lengths, 512), best_fit_decreasing_reference(lengths, 512)
    np.testing.assert_array_equal(got, ref)
    fill = np.bincount(got, weights=lengths)
    assert fill.max() <= 512  # no bin overflows; every item placed exactly once by construction


@pytest.mark.parametrize("lengths, capacity", [
    ([], 8), ([8], 8), ([1] * 9, 1), ([4] * 7, 8), ([5, 5, 5, 3, 3, 3], 8), (list(range(1, 200)), 200),
    (np.random.default_rng(0).integers(1, 70_000, 3000), 70_000),  # rooms past one 64-bit summary word
])
def test_cpp_equals_reference_on_edge_cases(lengths, capacity):
    got, ref = best_fit_decreasing(lengths, capacity), best_fit_decreasing_reference(lengths, capacity)
    np.testing.assert_array_equal(got, ref)
    if len(got):
        assert np.bincount(got, weights=lengths).max() <= capacity


def test_known_packing_and_errors():
    assert best_fit_decreasing([3, 5, 2, 7], 8).tolist() == [1, 1, 2, 0]
    # ties: equal rooms go to the lowest bin; equal lengths are placed in index order
    assert best_fit_decreasing([4, 4, 4, 4, 3, 3], 8).tolist() == [0, 0, 1, 1, 2, 2]
    assert best_fit_decreasing([6, 6, 2, 2], 8).tolist() == [0, 1, 0, 1]
    assert next_fit_reference([3, 5, 2, 7], 8).tolist() == [0, 0, 1, 2]
    for packer in (best_fit_decreasing, best_fit_decreasing_reference, next_fit_reference):
        with pytest.raises(ValueError, match="outside"):
            packer([9], 8)
        with pytest.raises(ValueError, match="outside"):
            packer([0], 8)


def test_rows_from_bins_keeps_input_order():
    rows = rows_from_bins(np.array([1, 0, 1, 2, 0]))
    assert [r.tolist() for r in rows] == [[1, 4], [0, 2], [3]]
    assert rows_from_bins(np.array([], dtype=np.int64)) == []
    assert fill_ratio([4, 4, 2], [0, 0, 1], 8) == 10 / 16
