"""Request-level types shared by the HTTP app (app/), the engine (serving/) and evaluation:
sampling parameters, a prompt with a hole (Infill, and reading one back from an editor's
FIM prompt), what a step hands out (Delta) and a finished completion.

The only module of serving/ the app imports. Torch-free on purpose: app/ and the evaluation client import this without pulling in the
model code, and there is one definition of "how to sample a completion" (one set of
defaults) for the service and the evaluation alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from training.fim_format import SENTINELS


@dataclass(frozen=True)
class SamplingParams:
    """How to generate one completion (validated at the HTTP layer, re-checked by the engine)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p (>= 1 token)
    top_k: int = 0  # 0 = no top-k filter
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None  # same prompt + params + seed -> same completion, whatever shares the batch
    # OpenAI legacy-API extras (app/openai_completions.py):
    logprobs: Optional[int] = None  # report each new token's logprob and this many alternatives
    prompt_logprobs: Optional[int] = None  # the same for the prompt's tokens (`echo`)
    presence_penalty: float = 0.0  # subtracted from a token's logit once it has been generated
    frequency_penalty: float = 0.0  # subtracted once per time it has been generated
    # Decode to max_new_tokens even past end-of-text (vLLM's benchmark parameter): the end
    # tokens sampled meanwhile count in usage (and appear in the text only with
    # skip_special_tokens False, as in vLLM).
    ignore_eos: bool = False
    # vLLM's extra sampling parameters, with vLLM's meaning (docs/api.md):
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the completion
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (after temperature)
    min_tokens: int = 0  # no end (end-of-text, stop_token_ids, stop strings) before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # sampling one of these ends the completion ("stop")
    include_stop_str_in_output: bool = False  # keep the stop string (or stop token's text) in the text
    skip_special_tokens: bool = True  # False: end tokens decoded past (ignore_eos) appear in the text


@dataclass(frozen=True)
class Infill:
    """A prompt with a hole: the text before and after the cursor (the API's prompt + suffix).
    The engine builds the fill-in-the-middle prompt from it (serving/engine/fim.py)."""
    prefix: str
    suffix: str


class NoInfill(ValueError):
    """A suffix was given to a model that was not trained to fill in the middle."""


def parse_psm(text: str) -> Optional[Infill]:
    """An editor that builds the FIM prompt itself (Continue's default template:
    `<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>`) sends it as a plain prompt.
    Read back as prefix + suffix, it gets the same far-side truncation as `suffix` would
    (cut from the left, the text would lose <fim_prefix> and the prefix first)."""
    head, mid, tail = SENTINELS[0], SENTINELS[2], SENTINELS[1]  # prefix, suffix, middle
    if not (text.startswith(head) and text.endswith(tail)) or any(text.count(t) != 1 for t in (head, mid, tail)):
        return None
    prefix, _, rest = text[len(head):].partition(mid)
    if SENTINELS[3] in text:
        return None
    return Infill(prefix, rest[: -len(tail)])


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a completion (or prompt) with its log-probability under the model
    (the raw distribution, before temperature/top-p/penalties, as vLLM reports it)."""

    id: int
    token: str  # its text on its own (a byte-level piece may be a partial character)
    logprob: Optional[float]  # None for a prompt's first token: nothing predicts it
    top: Optional[dict[str, float]] = None  # the most likely alternatives (+ the token itself)


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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens behind `text` (if asked)
    prompt_logprobs: Optional[list[TokenLogprob]] = None  # on the final Delta, if asked


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    truncated: bool
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: Optional[list[TokenLogprob]] = None


class GenerationError(RuntimeError):
    """Decoding failed for this one request (its batch-mates are unaffected)."""
