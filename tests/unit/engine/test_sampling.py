"""The batched sampler (serving/engine/sampling.py): every accepted parameter value yields a token,
filters keep at least one token, draws depend only on (seed, step)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from serving.engine.sampling import row_key, sample, uniform

VOCAB = 1000
TINY = 5e-324  # the smallest denormal double
EDGES_T = [TINY, 1e-300, 1e-45, 1e-30, 1e-6, 0.5, 1.0, 2.0, 100.0, 1e30, 1e300, sys.float_info.max]
EDGES_P = [TINY, 1e-300, 1e-45, 1e-8, 0.5, 0.95, 1.0 - 1e-16, 1.0]
EDGES_K = [0, 1, 2, 50, VOCAB - 1, VOCAB, VOCAB + 1, 2**62, 2**64, 16 * 10**30]  # JSON ints are unbounded
EDGES_U = [0.0, 0.5, 1.0 - 2**-53]


def logits_batch(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, VOCAB, generator=g) * 4
    x[0, 7] = 1e4  # a row with one dominant token
    if rows > 1:
        x[1] = 0.0  # a flat row: every token ties
    return x


@pytest.mark.parametrize("temperature", EDGES_T)
@pytest.mark.parametrize("top_p", EDGES_P)
def test_any_temperature_and_top_p_give_valid_tokens(temperature, top_p):
    x = logits_batch(4)
    for u in EDGES_U:
        ids = sample(x, [temperature] * 4, [0] * 4, [top_p] * 4, [u] * 4)
        assert len(ids) == 4 and all(type(i) is int and 0 <= i < VOCAB for i in ids)
        if u == 0.5 and temperature <= 100:  # the dominant token, unless the temperature flattens it
            assert ids[0] == 7


@pytest.mark.parametrize("top_k", EDGES_K)
@pytest.mark.parametrize("temperature", [TINY, 1.0, sys.float_info.max])
def test_any_top_k_gives_valid_tokens(top_k, temperature):
    x = logits_batch(3)
    for u in EDGES_U:
        ids = sample(x, [temperature] * 3, [top_k] * 3, [1.0] * 3, [u] * 3)
        assert len(ids) == 3 and all(0 <= i < VOCAB for i in ids)


def test_tiny_top_p_and_top_k_1_and_tiny_temperature_are_greedy():
    x = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1))
    greedy = x.argmax(-1).tolist()
    for u in (0.0, 0.3, 0.999999):
        assert sample(x, [1.0] * 6, [0] * 6, [1e-300] * 6, [u] * 6) == greedy
        assert sample(x, [1.0] * 6, [1] * 6, [1.0] * 6, [u] * 6) == greedy
        assert sample(x, [TINY] * 6, [0] * 6, [1.0] * 6, [u] * 6) == greedy


def test_filters_keep_only_allowed_tokens():
    x = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2))
    top5 = set(x[0].topk(5).indices.tolist())
    probs = torch.softmax(x[0], -1)
    order = probs.argsort(descending=True)
    nucleus_size = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    nucleus = set(order[:nucleus_size].tolist())
    picks_k, picks_p = set(), set()
    for i in range(400):
        u = uniform(row_key(9), i)
        picks_k.add(int(sample(x, [3.0], [5], [1.0], [u])[0]))
        picks_p.add(int(sample(x, [1.0], [0], [0.5], [u])[0]))
    assert picks_k == top5  # all five reachable at a high temperature, nothing else
    assert picks_p <= nucleus and len(picks_p) > 1


def test_sampling_follows_the_distribution():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [0.0] * 5]))  # -inf for the last five
    counts = torch.zeros(8)
    for i in range(4000):
        counts[int(sample(x, [1.0], [0], [1.0], [uniform(row_key(3), i)])[0])] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.2]), atol=0.03) and freq[3:].sum() == 0


def test_draws_depend_on_seed_and_step_only():
    assert uniform(row_key(5), 3) == uniform(row_key(5), 3)
    draws = [uniform(row_key(s), t) for s in (-(2**63), -1, 0, 1, 2**64 - 2) for t in range(50)]
    assert len(set(draws)) == len(draws) and all(0.0 <= d < 1.0 for d in draws)
    x = logits_batch(5, seed=4)
    u = [uniform(row_key(s), 0) for s in range(5)]
    temps, ks, ps = [0.7, 1.0, 1.3, 0.2, 2.0], [0, 40, 0, 5, 0], [0.9, 1.0, 0.95, 1.0, 0.5]
    together = sample(x, temps, ks, ps, u)
    alone = [int(sample(x[i:i + 1], temps[i:i + 1], ks[i:i + 1], ps[i:i + 1], u[i:i + 1])[0]) for i in range(5)]
    assert together == alone  # a row's token does not depend on its batch-mates


def full_path(x, temperature, top_k, top_p, u):
    """Path 3 (the whole vocabulary) for every row: what the other paths must agree with."""
    from serving.engine.sampling import _sample_full, probabilities

    rows = x.shape[0]
    probs = probabilities(x, [temperature] * rows, [top_k] * rows)
    return probs, _sample_full(probs, np.full(rows, top_p), np.array(u)).tolist()


def test_a_nucleus_wider_than_the_candidates_takes_the_full_path():
    from serving.engine.sampling import NUCLEUS_CANDIDATES, _sample_candidates

    x = torch.full((2, 4096), -8.0)
    x[0, :20] = 0.0  # 20 tied best tokens: the nucleus at p=0.5 needs more than the 16 candidates
    x[1, :2] = 5.0  # a peaked row beside it: its nucleus is the best 2
    for step in range(30):
        u = [uniform(row_key(r), step) for r in range(2)]
        probs, full = full_path(x, 1.0, 0, 0.5, u)
        values, cols = probs.topk(NUCLEUS_CANDIDATES, dim=-1)
        fast = [_sample_candidates(v, c, 0.5, d) for v, c, d in zip(values.tolist(), cols.tolist(), u)]
        assert fast[0] == -1 and 0 <= full[0] < 20
        assert fast[1] == full[1] and full[1] in (0, 1)
        assert sample(x, [1.0, 1.0], [0, 0], [0.5, 0.5], u) == full


def test_a_token_that_carries_top_p_alone_is_what_the_full_path_keeps():
    """Path 1 skips the draw when the best token alone has top_p of the mass (and over
    half of it); the full path, for every draw, gives that token too."""
    x = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(5))
    x[:, 3] += torch.tensor([2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 30.0])  # from open to certain rows
    for top_p in (0.3, 0.6, 0.9, 0.99, 1.0):
        settled = 0
        for step in range(25):
            u = [uniform(row_key(r), step) for r in range(8)]
            probs, full = full_path(x, 1.0, 0, top_p, u)
            assert sample(x, [1.0] * 8, [0] * 8, [top_p] * 8, u) == full
            q1 = probs[:, 3].tolist()
            settled += sum(q >= top_p and q > 0.51 for q in q1)
            assert all(f == 3 for f, q in zip(full, q1) if q >= top_p and q > 0.51)
        assert settled > 0


@pytest.mark.parametrize("temperature", [0.05, 0.2, 0.8, 1.0])
@pytest.mark.parametrize("top_p", [1e-300, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("top_k", [0, 3, 40])
def test_every_path_picks_the_full_paths_token(temperature, top_p, top_k):
    """Rows sampled among their best candidates (or settled by one token) give the token the
    whole vocabulary gives, for every draw; rows whose nucleus is too wide fall back."""
    from serving.engine.sampling import NUCLEUS_CANDIDATES, _sample_candidates

    g = torch.Generator().manual_seed(11)
    x = torch.randn(24, VOCAB, generator=g) * torch.linspace(0.5, 12, 24)[:, None]  # flat to peaked rows
    x[3, :20] = 9.0  # 20 tied best tokens: more than the candidates
    fast_rows = 0
    for step in range(40):
        u = [uniform(row_key(r), step) for r in range(24)]
        probs, full = full_path(x, temperature, top_k, top_p, u)
        values, cols = probs.topk(NUCLEUS_CANDIDATES, dim=-1)
        fast = [_sample_candidates(v, c, top_p, d) for v, c, d in zip(values.tolist(), cols.tolist(), u)]
        assert sample(x, [temperature] * 24, [top_k] * 24, [top_p] * 24, u) == full
        assert all(f in (-1, t) for f, t in zip(fast, full))
        assert fast[3] == -1 or top_p < 1e-200 or 0 < top_k < 20  # the tie is wider than the candidates
        fast_rows += sum(f >= 0 for f in fast)
    assert fast_rows > 40 * 24 // 4  # the candidates do serve most peaked rows


def test_a_rows_probabilities_do_not_depend_on_its_batch():
    """Rows that agree on the temperature scale by a number, others by a tensor, and a row
    whose logits / T overflows is redone shifted: none of that may change a row's values."""
    from serving.engine.sampling import probabilities

    x = logits_batch(6, seed=8)
    temps, ks = [0.2, 0.2, 1e-40, 0.7, 0.2, TINY], [0, 0, 0, 5, 0, 0]
    together = probabilities(x, temps, ks)
    assert bool(torch.isfinite(together).all())
    assert int(together[2].argmax()) == int(x[2].argmax()) and float(together[2].max()) == 1.0
    for i in range(6):
        assert torch.equal(probabilities(x[i:i + 1], temps[i:i + 1], ks[i:i + 1])[0], together[i])
    same = probabilities(x[[0, 1, 4]], [0.2] * 3, [0] * 3)  # one temperature: the scalar route
    assert torch.equal(same, together[[0, 1, 4]])
    # Temperature 1 skips the multiply (x * 1 is x): the same values as through a tensor of
    # 1/T, and the caller's logits untouched, with and without top-k.
    for k in (0, 5):
        before = x.clone()
        alone = probabilities(x, [1.0] * 6, [k] * 6)
        assert torch.equal(x, before)
        mixed = probabilities(x, [1.0] * 5 + [0.5], [k] * 6)  # a tensor scale, 1.0 in the first five rows
        assert torch.equal(alone[:5], mixed[:5])


def test_greedy_is_torchs_argmax():
    from serving.engine.sampling import greedy

    x = torch.randn(7, VOCAB, generator=torch.Generator().manual_seed(9))
    x[2] = 0.0  # every column ties: the first
    x[3, [5, 9]] = 100.0  # two best: the first
    x[4, 0] = float("-inf")
    expected = x.argmax(dim=-1).tolist()
    assert greedy(x) == expected and expected[2] == 0 and expected[3] == 5
    assert greedy(x.t().contiguous().t()) == expected  # strided, as a slice of HF's logits is
    assert greedy(x.bfloat16()) == x.bfloat16().float().argmax(dim=-1).tolist()
    with torch.inference_mode():
        assert greedy(x.clone()) == expected
