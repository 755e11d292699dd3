"""The C++ packer (mftcore._packing) against its Python reference."""

import numpy as np
import pytest

from mftcore.data.packing import best_fit_decreasing, best_fit_decreasing_reference


@pytest.mark.parametrize("seed", range(5))
def test_cpp_equals_reference(seed):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(4.5, 1.0, size=int(rng.integers(1, 400))).astype(np.int64), 1, 512)
    got, ref = best_fit_decreasing(lengths, 512), best_fit_decreasing_reference(lengths, 512)
    np.testing.assert_array_equal(got, ref)
    fill = np.bincount(got, weights=lengths)
    assert fill.max() <= 512  # no bin overflows; every item placed exactly once by construction


def test_known_packing_and_errors():
    assert best_fit_decreasing([3, 5, 2, 7], 8).tolist() == [1, 1, 2, 0]
    with pytest.raises(ValueError, match="outside"):
        best_fit_decreasing([9], 8)
    with pytest.raises(ValueError, match="outside"):
        best_fit_decreasing_reference([0], 8)
