"""Request models: strict types, ranges, unknown fields, OpenAI's neutral-only fields."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from app.schemas import (MAX_BODY_BYTES, MAX_NAME_CHARS, MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_STOP, MAX_STOP_CHARS,
                         CompleteRequest, CompletionRequest)


def field_of(exc: ValidationError) -> str:
    return str(exc.errors()[0]["loc"][0])


def test_defaults():
    r = CompleteRequest(prompt="def f(")
    assert (r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.stop, r.seed, r.stream) == (64, 0.0, 1.0, 0, [], None, False)
    o = CompletionRequest(model="m", prompt="x")
    assert (o.max_tokens, o.temperature, o.n, o.stops(), o.prompts()) == (16, 1.0, 1, [], ["x"])


@pytest.mark.parametrize("body, field", [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": "8"}, "max_new_tokens"),  # no string -> int coercion
    ({"prompt": "x", "max_new_tokens": 8.5}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": True}, "max_new_tokens"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": "abc"}, "stop"),  # /complete takes a list, like TGI
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "seed": "1"}, "seed"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "max_token": 5}, "max_token"),  # typo: unknown field
])
def test_complete_request_rejects(body, field):
    with pytest.raises(ValidationError) as e:
        CompleteRequest.model_validate(body)
    assert field_of(e.value) == field


def test_complete_request_accepts_int_for_float():
    assert CompleteRequest.model_validate({"prompt": "x", "temperature": 1, "top_p": 1}).temperature == 1.0


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": ["a", "x" * (MAX_PROMPT_CHARS + 1)]}, "prompt"),
    ({"model": "m", "prompt": "x", "stop": ""}, "stop"),
    ({"model": "m", "prompt": [1, "a"]}, "prompt"),  # token ids and text do not mix
    ({"model": "m", "prompt": [[1], []]}, "prompt"),
    ({"model": "m", "prompt": [-1]}, "prompt"),
    ({"model": "m", "prompt": "x", "echo": 0}, "echo"),  # 0 == False in Python, not in JSON
    ({"model": "m", "prompt": "x", "logprobs": 6}, "logprobs"),
    ({"model": "m", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    # The one field this server cannot honour: only its neutral value, as the schema says.
    ({"model": "m", "prompt": "x", "logit_bias": {"1": 2.0}}, "logit_bias"),
    ({"model": "m", "prompt": "x", "n": 0}, "n"),
    ({"model": "m", "prompt": "x", "n": 99}, "n"),
    ({"model": "m", "prompt": "x", "temperature": 2.5}, "temperature"),
    ({"model": "m", "prompt": "x", "stop": ["1", ""]}, "stop"),
    ({"model": "m", "prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
    ({"model": "m", "prompt": "x", "functions": []}, "functions"),
])
def test_completion_request_rejects(body, field):
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate(body)
    assert field_of(e.value) == field


def test_openai_neutral_fields():
    ok = CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"], "stop": "\n", "echo": False,
                                           "logprobs": None, "frequency_penalty": 0, "user": "u"})
    assert ok.stops() == ["\n"] and ok.prompts() == ["a", "b"]
    # The legacy API in full (app/openai_completions.py).
    full = CompletionRequest(model="m", prompt=[[1, 2], [3]], echo=True, logprobs=3, presence_penalty=0.5,
                             stop=[str(i) for i in range(40)], suffix="x", best_of=2)
    assert full.prompts() == [[1, 2], [3]] and len(full.stops()) == 40
    assert CompletionRequest(model="m", prompt=[5, 6]).prompts() == [[5, 6]]


def test_what_the_schema_allows_is_accepted():
    """An empty prompt (generation starts from the start-of-text token) and integral floats
    for integers (JSON Schema's `integer` includes 8.0) are valid, as the schema says."""
    assert CompleteRequest.model_validate({"prompt": "", "max_new_tokens": 8.0}).max_new_tokens == 8
    o = CompletionRequest.model_validate({"model": "m", "prompt": ["", "x"], "n": 2.0, "seed": 2**64 - 1})
    assert (o.n, o.prompts()) == (2, ["", "x"])
    schema = CompleteRequest.model_json_schema()["properties"]
    assert "minLength" not in schema["prompt"] and schema["seed"]["anyOf"][0]["maximum"] == 2**64 - 1


def test_the_largest_body_the_schema_allows_is_under_the_body_limit():
    """Every string at its longest, in characters that JSON writes longest (a non-BMP
    character: a 12-byte surrogate-pair escape), prompts as the longest list: still under
    the 413 limit, so no schema-valid request is refused for its size. Token-id prompts
    (ids of up to 6 digits) are shorter still."""
    wide = "\U0001F600"
    body = {"model": wide * MAX_NAME_CHARS, "prompt": [wide * MAX_PROMPT_CHARS] * MAX_PROMPTS,
            "suffix": wide * MAX_PROMPT_CHARS, "stop": [wide * MAX_STOP_CHARS] * MAX_STOP, "user": wide * MAX_NAME_CHARS,
            "max_tokens": 2**62, "temperature": 1.9999999999999998, "top_p": 2.2250738585072014e-308,
            "top_k": 2**62, "n": 8, "best_of": 8, "seed": -(2**63), "logprobs": 5, "frequency_penalty": -1.9999999999999998,
            "presence_penalty": -1.9999999999999998, "stream": False, "echo": False, "logit_bias": {}}
    CompletionRequest.model_validate(body)  # schema-valid
    size = len(json.dumps(body).encode())
    assert 6_000_000 < size <= MAX_BODY_BYTES, size
    ids = {**body, "prompt": [[999_999] * MAX_PROMPT_CHARS] * MAX_PROMPTS}
    CompletionRequest.model_validate(ids)
    assert len(json.dumps(ids).encode()) < size
    with pytest.raises(ValidationError, match="model"):
        CompletionRequest.model_validate({**body, "model": "m" * (MAX_NAME_CHARS + 1)})
    with pytest.raises(ValidationError, match="user"):
        CompletionRequest.model_validate({**body, "user": "u" * (MAX_NAME_CHARS + 1)})
    single = {"prompt": wide * MAX_PROMPT_CHARS, "suffix": wide * MAX_PROMPT_CHARS, "stop": [wide * MAX_STOP_CHARS] * MAX_STOP}
    CompleteRequest.model_validate(single)
    assert len(json.dumps(single).encode()) < MAX_BODY_BYTES
