"""pass@k: the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on
Code", the HumanEval paper), and its means over problems.

With n samples of which c pass, pass@k = 1 - C(n - c, k) / C(n, k): the chance that at least one of k
samples drawn without replacement from the n passes. The product form below never builds the
binomials (they overflow floats at n ~ 1000) and is exact to rounding: 1 - prod_{i=n-c+1}^{n} (1 - k/i).
"""

from __future__ import annotations

from typing import Iterable, Optional


def pass_at_k(n: int, c: int, k: int) -> float:
    """The estimate for one problem: n samples, c of them passed, k <= n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k holds a passing sample
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(counts: Iterable[tuple], ks: Iterable[int]) -> dict:
    """{"pass@k": mean over problems} for counts [(n, c)] per problem; a k above some problem's n is left out."""
    counts, out = list(counts), {}
    for k in ks:
        if counts and all(k <= n for n, _ in counts):
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
    return out


def pass_at_k_by_tag(rows: Iterable[tuple], ks: Iterable[int]) -> dict:
    """{tag: {"pass@k": ...}} for rows [(tag, n, c)]; problems without a tag (None) are left out."""
    groups: dict[Optional[str], list] = {}
    for tag, n, c in rows:
        if tag is not None:
            groups.setdefault(tag, []).append((n, c))
    return {tag: mean_pass_at_k(counts, list(ks)) for tag, counts in sorted(groups.items())}
