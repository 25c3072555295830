"""Request-level types shared by the HTTP app (app/), the engine (serving/) and evaluation.

Torch-free on purpose: app/ and the evaluation client import this without pulling in the
model code, and there is one definition of "how to sample a completion" (one set of
defaults) for the service and the evaluation alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class SamplingParams:
    """How to generate one completion (validated at the HTTP layer, re-checked by the engine)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p (>= 1 token)
    top_k: int = 0  # 0 = no top-k filter
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None  # same prompt + params + seed -> same completion, whatever shares the batch


@dataclass
class Delta:
    """What one request got from one decode step: new text, and the verdict once it is done."""

    text: str
    finished: bool = False
    finish_reason: Optional[str] = None  # "length" | "stop" | "eos" | "error" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False
    error: Optional[str] = None  # set with finish_reason "error": this request failed, alone


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    truncated: bool


class GenerationError(RuntimeError):
    """Decoding failed for this one request (its batch-mates are unaffected)."""
