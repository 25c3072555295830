"""Next-token sampling for a whole batch at once, each row with its own parameters and seed.

Vectorised: one pass of tensor ops over [rows, vocab] for every sampled row together, no
per-row Python beyond drawing one number. Reproducible: the only randomness is one uniform
number per row and step, `uniform(row_key, step)`, a counter-based draw (a hash of the
request's seed and the step), so a row samples the same token whatever shares its batch,
and a step can be retried without disturbing any row's random stream.

Sampling itself is inverse-CDF over the (filtered) distribution in vocabulary order: no
sort of the vocabulary unless a row asks for top-p, and then only of its top 64 (or 512)
candidates when they hold the requested mass; only a very flat distribution sorts it all.

The common editor request (top-p < 1, no top-k, a low temperature) has a nucleus of a few
tokens. Such a row is sampled among its best NUCLEUS_CANDIDATES tokens only
(`_sample_nucleus`): the same kept tokens, the same weights, the same cumulative sums in
vocabulary order, so the same token as the full path. Its only pass over the vocabulary is
a top-k: the row's total weight is bounded from the candidates rather than summed, and
summed only for a row the bound leaves undecided. A row whose nucleus does not fit (or
could tie beyond them) takes the full path. Either way a row's token depends on its own
logits, parameters and draw only.

Every accepted parameter value works: temperature anywhere in (0, inf) (denormals too),
top_p in (0, 1] and top_k >= 0 always keep at least the most likely token.
"""

from __future__ import annotations

from typing import Sequence

import torch

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
F32_MAX = float(torch.finfo(torch.float32).max)
TOP_P_CANDIDATES = (64, 512)  # top-p looks at this many best tokens; sorts all only if they lack the mass
NUCLEUS_CANDIDATES = 16  # the fast path's candidates: a low-temperature nucleus fits in far fewer
DROP_BELOW = -70.0  # scaled logits under this (weight < e^-70 of the best token) weigh 0


def mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijective 64-bit hash with good avalanche."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def row_key(seed: int) -> int:
    """A request's key for `uniform`: its seed (any int, negatives too) hashed once."""
    return mix64(seed & MASK64)


def uniform(key: int, step: int) -> float:
    """The request's random number in [0, 1) for this step: a pure function of (seed, step)."""
    return (mix64(key + (step + 1) * GOLDEN) >> 11) * (1.0 / (1 << 53))


def sample(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float],
           u: Sequence[float]) -> torch.Tensor:
    """One token id per row of `logits` [rows, vocab]; all rows sample (temperature > 0)."""
    rows, vocab = logits.shape
    nucleus = [b for b in range(rows) if top_p[b] < 1.0 and (int(top_k[b]) <= 0 or int(top_k[b]) >= vocab)]
    if not nucleus or vocab <= NUCLEUS_CANDIDATES:
        return _sample_full(logits, temperature, top_k, top_p, u)
    idx = torch.tensor(nucleus)
    out = torch.empty(rows, dtype=torch.long)
    got = _sample_nucleus(logits[idx] if len(nucleus) < rows else logits, [temperature[b] for b in nucleus],
                          [top_p[b] for b in nucleus], [u[b] for b in nucleus])
    out[idx] = got
    rest = sorted(set(range(rows)) - {b for b, t in zip(nucleus, got.tolist()) if t >= 0})
    if rest:
        r = torch.tensor(rest)
        out[r] = _sample_full(logits[r], [temperature[b] for b in rest], [top_k[b] for b in rest],
                              [top_p[b] for b in rest], [u[b] for b in rest])
    return out


def _inverse_temperature(temperature: Sequence[float]) -> torch.Tensor:
    """1/T per row, capped to stay finite (T may be as small as 5e-324)."""
    return torch.tensor([min(1.0 / t, F32_MAX) for t in temperature], dtype=torch.float32)


def _scaled(logits: torch.Tensor, inv_t: torch.Tensor) -> torch.Tensor:
    # Shift so the best token is exactly 0 before scaling: then no temperature, however
    # small or large, makes inf - inf or 0 * inf.
    logits = logits.float()
    return (logits - logits.amax(dim=-1, keepdim=True)) * inv_t[:, None]


def _sample_nucleus(logits: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float],
                    u: Sequence[float]) -> torch.Tensor:
    """Top-p rows (no top-k) sampled among their best NUCLEUS_CANDIDATES tokens; -1 for a
    row whose nucleus does not fit there (it takes the full path).

    Only one pass touches the whole vocabulary (the top-k). The row's total weight, which
    sets the nucleus mass, is not summed: it lies between the candidates' weight and that
    plus (vocab - candidates) times the last candidate's weight, and when the nucleus is
    the same at both ends it is the same for the exact total (the count of kept tokens only
    grows with the total). Only rows where it is not sum their vocabulary."""
    logits = logits.float()
    vocab = logits.shape[-1]
    raw, where = logits.topk(NUCLEUS_CANDIDATES, dim=-1)  # best first; raw[:, :1] is the row's max
    inv_t = _inverse_temperature(temperature)
    best = (raw - raw[:, :1]) * inv_t[:, None]  # = _scaled(logits) at these tokens, bit for bit
    w = torch.exp(best.masked_fill(best < DROP_BELOW, float("-inf")))  # = the full path's weights
    cum = w.double().cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
    p = torch.tensor(list(top_p), dtype=torch.float64)
    # Every other token weighs at most w[:, -1] (scaling is monotonic); the margins cover
    # float64 rounding of the full path's 4096-term sum.
    low = cum[:, -1] * (1 - 1e-12)
    high = (cum[:, -1] + (vocab - NUCLEUS_CANDIDATES) * w[:, -1].double()) * (1 + 1e-12)
    n_low, n_keep = _nucleus_size(before, p * low), _nucleus_size(before, p * high)
    unsure = (n_low != n_keep).nonzero().squeeze(1)
    if len(unsure):  # the tail could move these rows' nucleus: sum their whole vocabulary
        total = _total_weight(_scaled(logits[unsure], inv_t[unsure]))
        n_keep[unsure] = _nucleus_size(before[unsure], p[unsure] * total)
    floor = w.gather(1, (n_keep - 1)[:, None])
    # The nucleus fits if its smallest weight is above the last candidate's: then no token
    # outside the candidates (all weigh at most that) is kept, ties included.
    fits = (n_keep < NUCLEUS_CANDIDATES) & (floor[:, 0] > w[:, -1])
    kept = w.masked_fill(w < floor, 0.0)
    # Vocabulary order, as the full path's cumulative sum runs (its zeros add nothing).
    order = where.argsort(dim=-1)
    ids, kept = where.gather(1, order), kept.gather(1, order)
    cdf = kept.cumsum(dim=-1, dtype=torch.float64)
    x = torch.tensor(list(u), dtype=torch.float64)[:, None] * cdf[:, -1:]
    pos = torch.searchsorted(cdf, x, right=True).clamp(max=NUCLEUS_CANDIDATES - 1)
    stray = kept.gather(1, pos) == 0  # u close to 1 rounding past the last kept token
    pos = torch.where(stray, kept.argmax(dim=-1, keepdim=True), pos)
    token = ids.gather(1, pos).squeeze(1)
    return torch.where(fits, token, torch.full_like(token, -1))


def _nucleus_size(before: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """How many of the best tokens the nucleus keeps: those whose better tokens weigh less
    than `mass` (at least one)."""
    return (before < mass[:, None]).sum(dim=-1).clamp(min=1)


def _total_weight(scaled: torch.Tensor) -> torch.Tensor:
    """Each row's total weight (float64), as the full path sums it: weights under e^-70
    count 0 there and cannot move a total of at least 1 (the best token) here; the clamp
    keeps exp off subnormal floats, which take a very slow path on CPUs."""
    return torch.exp(scaled.clamp(min=-87.0)).sum(dim=-1, dtype=torch.float64)


def _sample_full(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float],
                 u: Sequence[float]) -> torch.Tensor:
    """Any row: the whole vocabulary filtered by top-k, then top-p, then inverse-CDF."""
    rows, vocab = logits.shape
    scaled = _scaled(logits, _inverse_temperature(temperature))
    ninf = float("-inf")
    # Below e^-70 of the best token a weight is negligible; dropping it also keeps exp (and
    # sums of weights) off subnormal floats, which take a very slow path on CPUs.
    scaled = scaled.masked_fill(scaled < DROP_BELOW, ninf)

    # top_k >= vocab filters nothing; clamping first keeps any Python int (1e31 included) in int64.
    k = torch.tensor([min(int(v), vocab) for v in top_k], dtype=torch.long)
    need_k = (k > 0) & (k < vocab)
    if bool(need_k.any()):
        kmax = int(k[need_k].max())
        kth = scaled.topk(kmax, dim=-1).values.gather(1, (k.clamp(1, kmax) - 1)[:, None])
        threshold = torch.where(need_k[:, None], kth, torch.full_like(kth, ninf))
        scaled = scaled.masked_fill(scaled < threshold, ninf)  # the best token (0) always stays

    weights = torch.exp(scaled)  # unnormalised; the best token weighs exactly 1
    p = torch.tensor(list(top_p), dtype=torch.float64)
    need_p = p < 1.0
    if bool(need_p.any()):
        every = bool(need_p.all())
        idx = None if every else need_p.nonzero().squeeze(1)
        w = weights if every else weights[idx]
        mass = (p if every else p[idx]) * w.sum(dim=-1, dtype=torch.float64)  # top_p of the total weight (no division:
        w = w.masked_fill(w < _nucleus_floor(w, mass), 0.0)  # tiny weights / total would be subnormal)
        if every:
            weights = w
        else:
            weights[idx] = w

    cdf = weights.cumsum(dim=-1, dtype=torch.float64)
    x = torch.tensor(list(u), dtype=torch.float64)[:, None] * cdf[:, -1:]
    # First index whose cdf exceeds x: a token of non-zero weight (the cdf steps up there).
    pos = torch.searchsorted(cdf, x, right=True).clamp(max=vocab - 1)
    # u close to 1 can round past the last kept token: fall back to the best token then.
    stray = weights.gather(1, pos) == 0
    if bool(stray.any()):
        pos = torch.where(stray, weights.argmax(dim=-1, keepdim=True), pos)
    return pos.squeeze(1)


def _nucleus_floor(weights: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest weight inside the nucleus: the fewest best tokens whose weight
    adds up to `mass` (top_p x the row's total; always at least one). Ties with it stay too."""
    for c in TOP_P_CANDIDATES:  # a partial top-k is much cheaper than sorting the vocabulary
        best = weights.topk(min(c, weights.shape[-1]), dim=-1).values
        if c >= weights.shape[-1] or not bool((best.double().sum(dim=-1) < mass).any()):
            break
    else:  # some row's nucleus is wider still (a flat distribution): sort it all
        best = weights.sort(dim=-1, descending=True).values
    cum = best.double().cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # weight of the better tokens
    return best.gather(1, (_nucleus_size(before, mass) - 1)[:, None])  # top_p of 1e-300 still keeps one
