"""Fill-in-the-middle prompts at inference (torch-free: the API, the engine and evaluation use it).

A checkpoint can infill when its folder has `fim.json` with `fim_rate` > 0 (written by
training/export/checkpoint.py from the data's FIM settings). The prompt is StarCoder's PSM,

    <fim_prefix> prefix <fim_suffix> suffix <fim_middle>   -> the model writes the middle

built from token ids, so a sentinel is always exactly one token whatever text surrounds it.
When prefix + suffix do not fit the context (minus the tokens to generate and the three
sentinels), each is cut on its far side from the cursor: the prefix loses its start, the
suffix its end. The prefix is kept longer (what precedes the cursor predicts the middle
best): the suffix keeps at most what the prefix leaves, but never less than a quarter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from serving.engine.params import Infill, NoInfill, parse_psm  # noqa: F401  (their home is params.py)
from training.fim_format import ROLES, SENTINELS, read_fim_metadata, sentinel_names

__all__ = ["FimSpec", "Infill", "NoInfill", "SENTINELS", "fim_prompt_ids", "parse_psm", "read_fim", "split_budget"]


@dataclass(frozen=True)
class FimSpec:
    prefix_id: int
    middle_id: int
    suffix_id: int
    pad_id: int
    fim_rate: float
    format: str


def read_fim(model_dir: str | Path, vocab: dict[str, int]) -> Optional[FimSpec]:
    """The model's FIM spec, or None when it was trained left to right only (or is an older
    folder without fim.json, or lacks the sentinel tokens)."""
    meta = read_fim_metadata(model_dir)
    if meta is None or float(meta.get("fim_rate", 0)) <= 0:
        return None
    names = sentinel_names(meta)
    ids = [vocab.get(names[k]) for k in ROLES]
    if any(i is None for i in ids):
        return None
    return FimSpec(*ids, fim_rate=float(meta["fim_rate"]), format=str(meta.get("format", "starcoder")))


def split_budget(n_prefix: int, n_suffix: int, budget: int) -> tuple[int, int]:
    """(prefix tokens kept, suffix tokens kept) with kept total <= budget."""
    budget = max(0, budget)
    if n_prefix + n_suffix <= budget:
        return n_prefix, n_suffix
    keep_suffix = min(n_suffix, max(budget - n_prefix, budget // 4))
    return min(n_prefix, budget - keep_suffix), keep_suffix


def fim_prompt_ids(prefix_ids: Sequence[int], suffix_ids: Sequence[int], spec: FimSpec,
                   budget: int) -> tuple[list[int], bool]:
    """(PSM prompt ids of at most `budget` tokens, whether anything was cut)."""
    keep_p, keep_s = split_budget(len(prefix_ids), len(suffix_ids), budget - 3)
    prefix = list(prefix_ids[len(prefix_ids) - keep_p:]) if keep_p else []
    suffix = list(suffix_ids[:keep_s])
    truncated = keep_p < len(prefix_ids) or keep_s < len(suffix_ids)
    return [spec.prefix_id, *prefix, spec.suffix_id, *suffix, spec.middle_id], truncated
