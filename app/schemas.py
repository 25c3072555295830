"""Request and response bodies of the HTTP API.

Strict on purpose: unknown fields are rejected (a typo like `max_token` must not be silently
ignored), types are not coerced ("5" is not 5, true is not 1), and every number has its
range here, so a bad request is a 4xx that names the field, never a 5xx deep in the engine.
The one limit that depends on the loaded model (max_new_tokens <= context - 1) is checked by
the routes, which know the model.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 32_000  # prompts are cut to the context anyway; this bounds tokenizer work
MAX_BODY_BYTES = 1_000_000  # enforced before JSON parsing (app/errors.py)
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_PROMPTS = 16  # OpenAI `prompt` as a list
MAX_N = 8
MAX_LOGPROBS = 5  # OpenAI's limit for the legacy API
MAX_STOP_TOTAL_CHARS = 16_000  # /v1/completions takes stop lists of any length; this bounds the work
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

FinishReason = Literal["length", "stop", "eos"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _check_stop(stop: list[str]) -> list[str]:
    for s in stop:
        if not s:
            raise ValueError("stop strings must be non-empty")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
    return stop


class CompleteRequest(_Strict):
    """POST /complete (field names follow HF text-generation-inference's `parameters`)."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    suffix: Optional[str] = Field(None, max_length=MAX_PROMPT_CHARS)  # fill in the middle (FIM models)

    _stop = field_validator("stop")(_check_stop)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class CompleteResponse(BaseModel):
    completion: str
    finish_reason: FinishReason
    usage: Usage
    truncated: bool
    model: str


# ---- OpenAI-compatible /v1/completions ------------------------------------------------

class StreamOptions(_Strict):
    include_usage: bool = False


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Strict):
    """POST /v1/completions: OpenAI's legacy completions API, as vLLM implements it.

    `prompt` is a string, a list of strings, a list of token ids or a list of such lists (a
    choice per prompt and sample, in order). `suffix` fills in the middle (FIM models only).
    `logit_bias` is accepted only at its neutral value (a 400 naming it otherwise).
    """

    model: str = Field(min_length=1)
    prompt: Prompt
    suffix: Optional[str] = Field(None, max_length=MAX_PROMPT_CHARS)
    max_tokens: Optional[int] = Field(16, ge=0)  # OpenAI's default; 0 only with echo (scores the prompt)
    temperature: Optional[float] = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default and range
    top_p: Optional[float] = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension, as in vLLM
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)
    stop: Union[None, str, list[str]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    frequency_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    user: Optional[str] = None  # accepted and ignored
    logit_bias: Optional[dict[str, float]] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Prompt) -> Prompt:
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            prompts = [v]
        else:
            prompts = v
        if not prompts:
            raise ValueError("prompt list must not be empty")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        for p in prompts:
            if not p:
                raise ValueError("each prompt must be a non-empty string or a non-empty list of token ids")
            if len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt must be at most {MAX_PROMPT_CHARS} characters (or token ids)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Union[None, str, list[str]]) -> Union[None, str, list[str]]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        _check_stop(stops)
        if sum(len(s) for s in stops) > MAX_STOP_TOTAL_CHARS:
            raise ValueError(f"stop strings must total at most {MAX_STOP_TOTAL_CHARS} characters")
        return v

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per prompt: its text or its token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    def unsupported(self) -> Optional[str]:
        """The first field set to a value this server cannot honour, if any."""
        return "logit_bias" if self.logit_bias else None


class Logprobs(BaseModel):
    """OpenAI's legacy logprobs object: per token its text, logprob, alternatives and offset
    in the choice's text."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: Optional[Logprobs] = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[CompletionUsage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "codecomplete"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    field: Optional[str] = None
    param: Optional[str] = None  # OpenAI's name for the same thing
    code: int
    request_id: Optional[str] = None  # on 500s: the id the server logged the failure under


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- POST /tokenize, /detokenize (vLLM's shapes) --------------------------------------

class TokenizeRequest(_Strict):
    model: Optional[str] = None
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    add_special_tokens: bool = True  # accepted; this tokenizer adds none


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: list[int] = Field(max_length=MAX_PROMPT_CHARS)


class DetokenizeResponse(BaseModel):
    prompt: str
