"""The unbiased pass@k estimator against its closed form 1 - C(n-c, k) / C(n, k), and its means."""

import math

import pytest

from mftcore.codeeval.passk import mean_pass_at_k, pass_at_k, pass_at_k_by_tag


def closed_form(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20, 37, 200])
def test_matches_the_closed_form(n):
    for c in range(n + 1):
        for k in sorted({1, 2, 5, 10, 100, n} & set(range(1, n + 1))):
            assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), rel=1e-12, abs=1e-12), (n, c, k)


def test_special_values():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction that passed
    assert pass_at_k(10, 3, 8) == 1.0  # fewer than 8 failures: any 8 hold a pass
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3)  # binomials that overflow floats
    assert 0 < pass_at_k(2000, 3, 1000) < 1
    for bad in [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_means_over_problems_and_tags():
    counts = [(10, 0), (10, 5), (10, 10)]
    means = mean_pass_at_k(counts, [1, 10, 20])
    assert means == {"pass@1": pytest.approx(0.5), "pass@10": pytest.approx(2 / 3)}  # no pass@20: n is 10
    rows = [("a", 4, 1), ("a", 4, 3), ("b", 4, 0), (None, 4, 4)]
    assert pass_at_k_by_tag(rows, [1]) == {"a": {"pass@1": pytest.approx(0.5)}, "b": {"pass@1": 0.0}}
    assert mean_pass_at_k([], [1]) == {}
