"""Next-token sampling for a whole batch at once, each row with its own parameters and seed.

Reproducible: the only randomness is one uniform number per row and step,
`uniform(row_key, step)`, a counter-based draw (a hash of the request's seed and the step),
so a row samples the same token whatever shares its batch, and a step can be retried (or
a draw left unused) without disturbing any row's random stream.

A row's distribution is softmax(logits / T) over the tokens its top-k keeps: one fused
softmax for the whole batch. Top-p keeps the fewest most likely tokens whose probability adds
up to top_p (ties with the last one too), and the token is drawn by inverse CDF over the kept
probabilities in vocabulary order.

Why the three paths: on a small model the sampler's cost is the number of tensor operations,
not their arithmetic (each costs far more than its arithmetic in a decode loop, whose
forward pass has just evicted their code and data from the caches), and editors sample at
a low temperature with top-p < 1, where the nucleus is tiny. So, in order:
  1. the most likely token alone carries top_p (and more than half the mass, so it is
     unique): the nucleus is that token, the draw cannot change it. The common case for
     editor requests (a low temperature, top-p 0.95).
  2. the nucleus fits in the best NUCLEUS_CANDIDATES tokens: one top-k over those rows,
     and the draw is made among the candidates in plain Python.
  3. the rest (top_p = 1, a flat distribution): the whole vocabulary, vectorised.
Each path gives the token the full path (3) would give for the same row and draw, bit for
bit: the same probabilities, the same float64 sums in the same order. Tests hold them to it.

Every accepted parameter value works: temperature anywhere in (0, inf) (denormals too),
top_p in (0, 1] and top_k >= 0 always keep at least the most likely token.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Collection, Sequence

import numpy as np
import torch

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
F32 = torch.finfo(torch.float32)
NUCLEUS_CANDIDATES = 16  # path 2's candidates: a low-temperature nucleus fits in far fewer
TOP_P_CANDIDATES = (64, 512)  # path 3's top-p looks at this many best tokens; sorts all only if they lack the mass
ALONE = 0.51  # path 1: a token with more than half the mass has no equal


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


def sample_rows(logits: torch.Tensor, rows: Sequence[Any], ends: Collection[int] = ()) -> list[int]:
    """The sampler of the decode loop: next token per row of `logits` [rows, vocab] after the
    row's penalties (repetition, presence, frequency), its min_tokens ban on ending and its
    min_p filter; argmax for temperature 0, else seeded top-k / top-p.
    A row is an output.Row: its `params`, its `tokens` so far, its `prompt_ids`, its `key` and
    `generated` count. `ends`: the ids that end a completion (min_tokens holds them off)."""
    params = [r.params for r in rows]
    logits = apply_repetition_penalty(logits, params, [getattr(r, "prompt_ids", ()) for r in rows],
                                      [r.tokens for r in rows])
    logits = apply_penalties(logits, params, [r.tokens for r in rows])
    logits = ban_early_ends(logits, rows, ends)
    logits = apply_min_p(logits, params)
    sampled = [b for b, row in enumerate(rows) if row.params.temperature > 0]
    if not sampled:
        return greedy(logits)
    picked_rows = [rows[b] for b in sampled]
    x = logits if len(sampled) == len(rows) else logits[torch.tensor(sampled)]
    picked = sample(x, [r.params.temperature for r in picked_rows], [r.params.top_k for r in picked_rows],
                    [r.params.top_p for r in picked_rows], _Draws(picked_rows))
    if len(sampled) == len(rows):
        return picked
    choice = greedy(logits)
    for b, token in zip(sampled, picked):
        choice[b] = token
    return choice


class _Draws(Sequence[float]):
    """The rows' uniform draws for this step, each computed only when the sampler asks for it
    (a row whose best token carries top_p needs none)."""

    def __init__(self, rows: Sequence[Any]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, b):  # type: ignore[override]
        row = self.rows[b]
        return uniform(row.key, row.generated)


def apply_repetition_penalty(logits: torch.Tensor, params: Sequence[Any], prompts: Sequence[Sequence[int]],
                             generated: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits with each row's repetition penalty applied (a copy if any applies). vLLM's (and
    CTRL's) definition, on the prompt's tokens and those generated so far: a positive logit is
    divided by the penalty, a negative one multiplied by it (penalty 1: unchanged)."""
    rows = [b for b, p in enumerate(params) if p.repetition_penalty != 1.0 and (prompts[b] or generated[b])]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for b in rows:
        seen = torch.tensor(sorted({t for t in (*prompts[b], *generated[b]) if 0 <= t < vocab}), dtype=torch.long)
        x, penalty = logits[b, seen], params[b].repetition_penalty
        logits[b, seen] = torch.where(x > 0, x / penalty, x * penalty)
    return logits


def ban_early_ends(logits: torch.Tensor, rows: Sequence[Any], ends: Collection[int]) -> torch.Tensor:
    """Logits in which a row that has not yet generated min_tokens cannot sample a token that
    would end it (its stop_token_ids, and the end ids unless it ignores them), as vLLM does
    (a copy if any row is held)."""
    held = [b for b, r in enumerate(rows) if r.generated < r.params.min_tokens]
    if not held:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for b in held:
        p = rows[b].params
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(ends))
        banned_ids = [t for t in banned if 0 <= t < vocab]
        if banned_ids:
            logits[b, torch.tensor(banned_ids, dtype=torch.long)] = float("-inf")
    return logits


def apply_min_p(logits: torch.Tensor, params: Sequence[Any]) -> torch.Tensor:
    """Logits without the tokens a row's min_p drops: those whose probability after temperature
    is below min_p x the best token's (vLLM's rule). In logits that is l < max + T * ln(min_p),
    so every sampling path below sees the same filtered row. Greedy rows are left alone (their
    best token always stays); a copy if any row filters."""
    rows = [b for b, p in enumerate(params) if p.min_p > 0.0 and p.temperature > 0]
    if not rows:
        return logits
    logits = logits.clone()
    for b in rows:
        p = params[b]
        x = logits[b].float()
        floor = float(x.max()) + p.temperature * math.log(p.min_p)
        logits[b] = x.masked_fill(x < floor, float("-inf")).to(logits.dtype)
    return logits


def apply_penalties(logits: torch.Tensor, params: Sequence[Any],
                    generated: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits with each row's presence/frequency penalties applied (a copy if any applies).
    OpenAI's definition, on the tokens generated so far, as vLLM does:
    logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)."""
    rows = [b for b, p in enumerate(params) if (p.presence_penalty or p.frequency_penalty) and generated[b]]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for b in rows:
        counts = torch.bincount(torch.tensor(list(generated[b]), dtype=torch.long), minlength=vocab)[:vocab]
        p = params[b]
        logits[b] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float],
           u: Sequence[float]) -> list[int]:
    """One token id per row of `logits` [rows, vocab]; all rows sample (temperature > 0)."""
    rows, vocab = logits.shape
    probs, tokens, q1 = _scored(logits, temperature, top_k)
    # Path 1. (Path 3 would keep only this token: the float64 sum before the second-best
    # token is q1, which is not below top_p.)
    open_rows = [b for b in range(rows) if not (q1[b] >= top_p[b] and q1[b] > ALONE)]
    if not open_rows:
        return tokens
    # Rows are picked out through numpy: torch's indexing costs several times more here.
    table = probs.numpy()
    # Path 2, for the top-p rows (a vocabulary no larger than the candidates: path 3).
    top_p_rows = vocab > NUCLEUS_CANDIDATES
    nucleus = [b for b in open_rows if top_p_rows and top_p[b] < 1.0]
    full = [b for b in open_rows if not (top_p_rows and top_p[b] < 1.0)]
    if nucleus:
        values, cols = torch.from_numpy(table[nucleus]).topk(NUCLEUS_CANDIDATES, dim=-1)
        for b, v, c in zip(nucleus, values.tolist(), cols.tolist()):
            tokens[b] = _sample_candidates(v, c, top_p[b], u[b])
            if tokens[b] < 0:
                full.append(b)
    # Path 3.
    if full:
        picked = _sample_full(torch.from_numpy(table[full]), np.array([top_p[b] for b in full]),
                              np.array([u[b] for b in full]))
        for b, t in zip(full, picked.tolist()):
            tokens[b] = t
    return tokens


def greedy(logits: torch.Tensor) -> list[int]:
    """Each row's most likely token (the first, on a tie). Through numpy: its argmax is
    vectorised, torch's CPU argmax is a scalar loop."""
    return logits.float().numpy().argmax(axis=1).tolist()


def probabilities(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int]) -> torch.Tensor:
    """Each row's softmax(logits / T) over the tokens its top-k keeps (top_k 0 or >= vocab:
    all) [rows, vocab]."""
    return _scored(logits, temperature, top_k)[0]


def _scored(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int]) -> tuple[torch.Tensor, list[int], list[float]]:
    """probabilities(), with each row's most likely token and its probability (numpy's argmax:
    see greedy(); the first of equals)."""
    rows = logits.shape[0]
    probs = _softmax(logits, temperature, top_k, shift=False)
    table = probs.numpy()
    best = table.argmax(axis=1)
    q1 = table[np.arange(rows), best].tolist()
    # A temperature so low that logits / T overflows float32 makes the row NaN (all of it: its
    # sum is NaN; argmax then finds a NaN). Such rows again, shifted so that their best
    # token is exactly 0 before scaling: then no temperature, however small, makes inf - inf.
    # (Not every row: the shift is one more pass over the vocabulary, and a row takes the
    # same way whatever its batch.)
    bad = [b for b in range(rows) if q1[b] != q1[b]]
    if bad:
        probs[bad] = _softmax(logits[bad], [temperature[b] for b in bad], [top_k[b] for b in bad], shift=True)
        best[bad] = table[bad].argmax(axis=1)
        for b in bad:
            q1[b] = float(table[b, best[b]])
    return probs, best.tolist(), q1


def _softmax(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int], shift: bool) -> torch.Tensor:
    rows, vocab = logits.shape
    logits = logits.float()
    # A plain number when the rows agree on 1/T (the usual case: one tensor op fewer); being
    # a float32 value, it multiplies exactly as the tensor would.
    inv = [_inverse_temperature(t) for t in temperature]
    scale = inv[0] if inv.count(inv[0]) == rows else torch.tensor(inv)[:, None]
    if shift:
        scaled = (logits - logits.amax(dim=-1, keepdim=True)).mul_(scale)
    elif isinstance(scale, float) and scale == 1.0:
        scaled = None  # T = 1 (OpenAI's default): x * 1 is x, so no pass over the vocabulary
    else:
        scaled = logits * scale
    if any(0 < k < vocab for k in top_k):  # (k >= vocab filters nothing; JSON ints can be 1e31)
        if scaled is None:
            scaled = logits.clone()  # the caller's logits stay as they are
        k = torch.tensor([min(max(int(k), 0), vocab) for k in top_k])
        need = (k > 0) & (k < vocab)
        kmax = int(k[need].max())
        kth = scaled.topk(kmax, dim=-1).values.gather(1, (k.clamp(1, kmax) - 1)[:, None])
        threshold = torch.where(need[:, None], kth, torch.full_like(kth, float("-inf")))
        scaled.masked_fill_(scaled < threshold, float("-inf"))  # the best token always stays
    if scaled is None:
        return torch.softmax(logits, dim=-1)
    return torch.softmax(scaled, dim=-1, out=scaled)  # in place: one [rows, vocab] buffer in the cache, not two


@functools.lru_cache(maxsize=4096)
def _inverse_temperature(t: float) -> float:
    """1/T as a float32 value that is neither inf (T may be 5e-324) nor 0 (T may be 1e308:
    0 * -inf would be NaN for a token the model rules out). Cached: requests reuse a few
    temperatures, and this runs for every row at every step."""
    return float(np.float32(min(max(1.0 / t, F32.tiny), F32.max)))


def _sample_candidates(best: list[float], cols: list[int], top_p: float, u: float) -> int:
    """Path 2: the token a top-p row samples, from its best tokens' probabilities (largest
    first) and columns; -1 if its nucleus may reach past them (then path 3 decides)."""
    before, keep = 0.0, 0  # as _nucleus_size counts: tokens whose better tokens add up to less than top_p
    while keep < len(best) and before < top_p:
        before += best[keep]
        keep += 1
    floor = best[keep - 1]
    # It fits if its smallest probability is above the last candidate's: then no token
    # outside the candidates (all at most that) is kept, ties included.
    if keep >= len(best) or floor <= best[-1]:
        return -1
    kept = sorted((c, p) for c, p in zip(cols, best) if p >= floor)  # vocabulary order, as path 3 sums
    total, cdf = 0.0, []
    for _, p in kept:
        total += p
        cdf.append(total)
    x = u * total
    for (c, _), edge in zip(kept, cdf):
        if edge > x:
            return c
    return min(kept, key=lambda cp: (-cp[1], cp[0]))[0]  # x rounded up to the total: as _inverse_cdf


def _sample_full(probs: torch.Tensor, top_p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Path 3, for any row: the whole vocabulary's probabilities, top-p applied, then inverse CDF."""
    cut = np.flatnonzero(top_p < 1.0)
    if len(cut):
        every = len(cut) == len(top_p)
        w = probs if every else probs[torch.from_numpy(cut)]
        w = w.masked_fill(w < _nucleus_floor(w, top_p[cut]), 0.0)
        if every:
            probs = w
        else:
            probs = probs.clone()
            probs[torch.from_numpy(cut)] = w
    return _inverse_cdf(probs.numpy(), u)


def _nucleus_size(best: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """How many of the best tokens (each row's probabilities, largest first) the nucleus
    keeps: those whose better tokens add up to less than top_p (always at least one)."""
    cum = np.cumsum(best, axis=1, dtype=np.float64)
    before = np.zeros_like(cum)
    before[:, 1:] = cum[:, :-1]
    return np.maximum((before < top_p[:, None]).sum(axis=1), 1)


def _nucleus_floor(probs: torch.Tensor, top_p: np.ndarray) -> torch.Tensor:
    """Per row, the smallest probability inside the nucleus [rows, 1]. Ties with it stay too."""
    for c in TOP_P_CANDIDATES:  # a partial top-k is much cheaper than sorting the vocabulary
        best = probs.topk(min(c, probs.shape[-1]), dim=-1).values
        if c >= probs.shape[-1] or not bool((best.double().sum(dim=-1).numpy() < top_p).any()):
            break
    else:  # some row's nucleus is wider still (a flat distribution): sort it all
        best = probs.sort(dim=-1, descending=True).values
    best = best.numpy()
    keep = _nucleus_size(best, top_p)  # top_p of 1e-300 still keeps one
    return torch.from_numpy(best[np.arange(len(best)), keep - 1][:, None].copy())


def _inverse_cdf(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row, the column where u lands when the row's weights are laid end to end (in
    column order), scaled to their total: column i with probability weights[i] / total."""
    cdf = np.cumsum(weights, axis=1, dtype=np.float64)
    x = u * cdf[:, -1]
    at = (cdf <= x[:, None]).sum(axis=1)  # the first column whose cdf passes x: a non-zero weight
    # u close to 1 can round x up to the total: then the most likely token.
    return np.where(at < weights.shape[1], at, weights.argmax(axis=1))
