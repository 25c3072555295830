"""A request's prompt as token ids, the same for every engine (serving/engine/engines.py):
text, token ids or an Infill (the FIM prompt, built here from fim.json, never by vLLM),
keeping the prompt's LAST tokens so that it and the tokens to generate fit the context."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from serving.engine.fim import FimSpec, Infill, NoInfill, fim_prompt_ids


def encode_prompt(prompt: "str | Sequence[int] | Infill", max_new_tokens: int, *, context_length: int,
                  encode: Callable[[str], list[int]], fim: Optional[FimSpec], empty_id: int,
                  model_name: str) -> tuple[list[int], bool]:
    """(prompt ids, whether the prompt was cut). `empty_id` stands in for an empty prompt
    (end-of-text: generation starts as after a document). ValueError for an impossible
    max_new_tokens, NoInfill for an Infill the model cannot serve."""
    if not 1 <= max_new_tokens <= context_length - 1:
        raise ValueError(f"max_new_tokens must be in [1, {context_length - 1}]")
    budget = context_length - max_new_tokens
    if isinstance(prompt, Infill):
        if fim is None:
            raise NoInfill(f"model {model_name!r} was trained without fill-in-the-middle "
                           "(no fim.json with fim_rate > 0): it cannot complete with a suffix")
        return fim_prompt_ids(encode(prompt.prefix), encode(prompt.suffix), fim, budget)
    ids = encode(prompt) if isinstance(prompt, str) else list(prompt)
    if len(ids) > budget:
        return ids[-budget:], True
    if not ids:
        ids = [empty_id]
    return ids, False
