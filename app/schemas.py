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


class CompletionRequest(_Strict):
    """POST /v1/completions: the fields of OpenAI's legacy completions API.

    Fields we cannot honour (logprobs, echo, penalties, ...) are accepted only at their
    neutral value, so a client that always sends them works, and one that relies on them
    gets a 400 naming the field instead of silently different behaviour.
    """

    model: str = Field(min_length=1)
    prompt: Union[str, list[str]]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default and range
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension, as in vLLM
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[None, str, list[str]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: Optional[str] = None
    # Neutral-only fields.
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Union[str, list[str]]) -> Union[str, list[str]]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("prompt list must not be empty")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        for p in prompts:
            if not p:
                raise ValueError("prompt must be a non-empty string")
            if len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt must be at most {MAX_PROMPT_CHARS} characters")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Union[None, str, list[str]]) -> Union[None, str, list[str]]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        _check_stop(stops)
        return v

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def unsupported(self) -> Optional[str]:
        """The first field set to a value this server cannot honour, if any."""
        neutral = {"echo": (None, False), "logprobs": (None, 0), "best_of": (None, 1), "suffix": (None, ""),
                   "frequency_penalty": (None, 0.0), "presence_penalty": (None, 0.0), "logit_bias": (None, {})}
        for name, ok in neutral.items():
            if getattr(self, name) not in ok:
                return name
        return None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: None = None


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
