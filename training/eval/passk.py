"""The unbiased pass@k estimator of the Codex paper (Chen et al. 2021, eq. 1).

With n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that a random
k-subset of the n samples holds at least one pass. Binomials overflow floats for n ~ 200, so
the ratio is computed as the product prod_{i=n-c+1}^{n} (1 - k/i), which stays in [0, 1].
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn (without replacement) from n passes.

    Raises ValueError when k > n: the estimate is undefined there (the paper needs n >= k),
    and silently returning a number would mislead. `summarize` skips such k instead.
    """
    if n < 0 or c < 0 or k < 1:
        raise ValueError(f"need n >= 0, c >= 0, k >= 1 (got n={n}, c={c}, k={k})")
    if c > n:
        raise ValueError(f"more correct samples than samples (c={c} > n={n})")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem (n={n})")
    if n - c < k:  # every k-subset contains a pass
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean over problems of pass@k, from (n, c) per problem."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("no problems to score")
    return float(np.mean(values))


def summarize(counts: Sequence[tuple[int, int]], ks: Iterable[int] = (1, 10, 100)) -> dict[str, float]:
    """{"pass@k": value} for every k that every problem has enough samples for."""
    min_n = min(n for n, _ in counts) if counts else 0
    return {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks if k <= min_n}
