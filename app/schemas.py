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
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_PROMPTS = 16  # OpenAI `prompt` as a list
MAX_NAME_CHARS = 256  # `model`, `user`
# Enforced before JSON parsing (app/errors.py). Above every schema-valid body as a client
# serialises it (no padding whitespace): 16 prompts of 32,000 characters, each written as a
# 12-byte surrogate-pair escape, are 6.1 MB; tests/unit/app/test_schemas.py holds the bound to that,
# so a request the schema allows never meets a 413.
MAX_BODY_BYTES = 8_000_000
MAX_N = 8
MAX_LOGPROBS = 5  # OpenAI's limit for the legacy API
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_REPETITION_PENALTY = 10.0  # vLLM asks only > 0; past a few it garbles every token seen
MAX_STOP_TOKEN_IDS = 64

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
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def _integral(v: object) -> object:
    """JSON Schema's `integer` includes 540.0 (see _Strict._integral_floats), inside lists too."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


# A token id, and a prompt as token ids (the legacy API); ids below the vocabulary size are
# checked by the route and stated in the served schema (app/api.py).
TokenId = Annotated[int, Field(ge=0), BeforeValidator(_integral)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


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
    suffix: Optional[Prompt] = None  # fill in the middle (a model trained with FIM; 400 otherwise)
    ignore_eos: bool = False  # decode to max_new_tokens past end-of-text (vLLM's benchmark parameter)


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
    """POST /v1/completions: OpenAI's legacy completions API, as vLLM implements it
    (app/openai_completions.py serves it).

    `prompt`: a string, a list of strings, a list of token ids or a list of such lists (a
    choice per prompt and sample, in order). `suffix` fills in the middle (FIM-trained models
    only; a 400 naming it otherwise). `stop`: any number of strings. `user` is accepted and
    ignored. `logit_bias` is accepted only at its neutral value (the schema says so), so a
    client that relies on it gets a 422 naming the field instead of silently different output.
    """

    # What only combinations of fields can say, as JSON-schema conditionals (the route enforces
    # the same, 400 naming the field): best_of > 1 neither streams nor echoes, echo takes no suffix.
    model_config = ConfigDict(**_Strict.model_config, json_schema_extra={"allOf": [
        {"if": {"properties": {"echo": {"const": True}}, "required": ["echo"]},
         "then": {"properties": {"suffix": {"type": "null"}, "best_of": {"anyOf": [{"type": "null"}, {"const": 1}]}}}},
        {"if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
         "then": {"properties": {"best_of": {"anyOf": [{"type": "null"}, {"const": 1}]}}}},
    ]})

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    prompt: Union[Prompt, TokenIds, Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)],
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    suffix: Optional[Prompt] = None
    max_tokens: Optional[int] = Field(16, ge=0)  # OpenAI's default; 0: nothing generated (with echo: scores the prompt)
    temperature: Optional[float] = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default and range
    top_p: Optional[float] = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension, as in vLLM
    ignore_eos: bool = False  # extension, as in vLLM (`vllm bench serve --ignore-eos` sends it)
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)  # below n it is n
    stop: Union[None, StopString, list[StopString]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    user: Optional[Name] = None
    # vLLM's extra sampling parameters (what `vllm bench serve` and pass-through clients send),
    # with vLLM's meaning; every engine honours them (docs/api.md).
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0)  # above max_tokens it is max_tokens (vLLM answers 400; no JSON schema can say that)
    stop_token_ids: Optional[list[TokenId]] = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Accepted at their neutral values only (a client relying on more gets a 422 naming them).
    use_beam_search: Optional[Annotated[Literal[False], BeforeValidator(_only_bool)]] = None
    length_penalty: Optional[float] = Field(None, ge=1.0, le=1.0)
    add_special_tokens: bool = True  # accepted; this tokenizer adds none
    spaces_between_special_tokens: bool = True  # accepted; special tokens never reach the text between words
    # Neutral-only.
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=0)

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per prompt: its text or its token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class Logprobs(BaseModel):
    """OpenAI's legacy logprobs object: per token its text, logprob, alternatives (the
    `logprobs` most likely, plus the token itself) and offset in the choice's text."""

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


# ---- POST /tokenize, /detokenize (vLLM's shapes) --------------------------------------

class TokenizeRequest(_Strict):
    model: Optional[Name] = None
    prompt: Prompt
    add_special_tokens: bool = True  # accepted; this tokenizer adds none


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Strict):
    model: Optional[Name] = None
    tokens: list[TokenId] = Field(max_length=MAX_PROMPT_CHARS)


class DetokenizeResponse(BaseModel):
    prompt: str
