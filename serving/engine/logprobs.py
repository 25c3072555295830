"""Log-probabilities for the decode loop (OpenAI's legacy API).

- `logprobs`: each new token's log-probability under the model's raw distribution (log
  softmax of the logits, before temperature, top-p and penalties: what vLLM reports by
  default), and the `k` most likely tokens at that step, plus the chosen one (OpenAI: "up
  to logprobs+1 elements").
- prompt logprobs (`echo`): one forward pass over the prompt; token t is scored by the
  logits at t-1, the first token has none.

(The presence/frequency penalties change what is sampled, not what is reported: they live
with the sampler, serving/engine/sampling.py.)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from serving.engine.params import SamplingParams, TokenLogprob

Piece = Callable[[int], str]  # token id -> its text


def _top(row_lp: torch.Tensor, k: int, chosen: int, piece: Piece) -> dict[str, float]:
    top: dict[str, float] = {}
    if k > 0:
        vals, idx = row_lp.topk(min(k, row_lp.shape[-1]))
        top = {piece(int(i)): float(v) for v, i in zip(vals.tolist(), idx.tolist())}
    top.setdefault(piece(chosen), float(row_lp[chosen]))
    return top


def step_logprobs(logits: torch.Tensor, params: Sequence[SamplingParams], chosen: Sequence[int],
                  piece: Piece) -> list[Optional[TokenLogprob]]:
    """Per row: the chosen token's entry if the row asked for logprobs, else None."""
    want = [b for b, p in enumerate(params) if p.logprobs is not None]
    out: list[Optional[TokenLogprob]] = [None] * len(params)
    if not want:
        return out
    lp = torch.log_softmax(logits[torch.tensor(want)].float(), dim=-1)
    for j, b in enumerate(want):
        t = int(chosen[b])
        out[b] = TokenLogprob(t, piece(t), float(lp[j, t]), _top(lp[j], int(params[b].logprobs), t, piece))
    return out


@torch.inference_mode()
def prompt_logprobs(model, ids: Sequence[int], k: int, piece: Piece) -> list[TokenLogprob]:
    """Every prompt token's entry (the first has logprob None and no alternatives)."""
    x = torch.tensor([list(ids)], dtype=torch.long)
    lp = torch.log_softmax(model(input_ids=x).logits[0].float(), dim=-1)
    out = [TokenLogprob(int(ids[0]), piece(int(ids[0])), None, None)]
    for t in range(1, len(ids)):
        tok = int(ids[t])
        out.append(TokenLogprob(tok, piece(tok), float(lp[t - 1, tok]), _top(lp[t - 1], k, tok, piece)))
    return out
