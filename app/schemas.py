"""Request and response bodies of the HTTP API.

Strict on purpose: unknown fields are rejected (a typo like `max_token` must not be silently
ignored), types are not coerced ("5" is not 5, true is not 1), and every number has its
range here, so a bad request is a 4xx that names the field, never a 5xx deep in the engine.
Every constraint is a JSON-schema constraint (no custom validators), so the OpenAPI schema
states exactly what validation enforces. The limits that depend on the loaded model
(max_new_tokens <= context - 1, the model's name) are checked by the routes, which know the
model, and written into the served schema by app/api.py.

An empty prompt is allowed: generation then starts from the start-of-text token, as
OpenAI's API does (an editor at the top of an empty file).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_PROMPT_CHARS = 32_000  # prompts are cut to the context anyway; this bounds tokenizer work
MAX_BODY_BYTES = 1_000_000  # enforced before JSON parsing (app/errors.py)
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_PROMPTS = 16  # OpenAI `prompt` as a list
MAX_N = 8
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

FinishReason = Literal["length", "stop", "eos"]


class _Strict(BaseModel):
    # allow_inf_nan=False: Python's JSON parser accepts NaN and Infinity, JSON does not.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        """JSON Schema's `integer` includes 8.0 (JSON has one number type): take it as 8 for
        integer fields. Anything else (8.5, "8", true) still fails strict validation."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, v in data.items():
            f = cls.model_fields.get(name)
            if f is not None and isinstance(v, float) and v.is_integer() and _is_int(f.annotation):
                out[name] = int(v)
        return out


def _is_int(annotation: Any) -> bool:
    return annotation is int or (int in get_args(annotation) and float not in get_args(annotation))


def _only_bool(v: object) -> object:
    """Literal[False] would accept 0 (0 == False in Python); JSON's false is a boolean."""
    if v is not None and not isinstance(v, bool):
        raise ValueError("Input should be a valid boolean")
    return v


Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class CompleteRequest(_Strict):
    """POST /complete (field names follow HF text-generation-inference's `parameters`)."""

    prompt: Prompt
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP)
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False


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
    neutral value (the schema says which), so a client that always sends them works, and
    one that relies on them gets a 422 naming the field instead of silently different
    behaviour.
    """

    model: str = Field(min_length=1)
    prompt: Union[Prompt, Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)]]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default and range
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension, as in vLLM
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[None, StopString, Annotated[list[StopString], Field(max_length=MAX_STOP)]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: Optional[str] = None
    # Neutral-only fields.
    echo: Annotated[Optional[Literal[False]], BeforeValidator(_only_bool)] = None
    logprobs: Optional[int] = Field(None, ge=0, le=0)
    best_of: Optional[int] = Field(None, ge=1, le=1)
    suffix: Optional[str] = Field(None, max_length=0)
    frequency_penalty: Optional[float] = Field(None, ge=0.0, le=0.0)
    presence_penalty: Optional[float] = Field(None, ge=0.0, le=0.0)
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=0)

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


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
    infill: bool = False  # the model was trained to fill in the middle: requests may send a suffix


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    field: Optional[str] = None
    param: Optional[str] = None  # OpenAI's name for the same thing
    code: int
    request_id: Optional[str] = None  # on 500s: the id the server logged the failure under


class ErrorResponse(BaseModel):
    error: ErrorDetail
