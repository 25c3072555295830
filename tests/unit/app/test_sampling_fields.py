"""vLLM's extra sampling fields on /v1/completions: the body `vllm bench serve` sends is
served, each field reaches the engine with its meaning, and out-of-range values are 4xx
naming the field."""

from __future__ import annotations

import pytest

from tests.support.streams import sse_events

PROMPT = "def foo(x):\n    return x"


def post(client, engine, **body):
    return client.post("/v1/completions", json={"model": engine.model_name, **body})


def test_the_body_vllm_bench_serve_sends_is_served(client, engine):
    # vllm/benchmarks/lib/endpoint_request_func.py: async_request_openai_completions, --ignore-eos,
    # and the sampling flags it passes through as extra_body.
    body = {"prompt": PROMPT, "repetition_penalty": 1.0, "max_tokens": 8, "logprobs": None, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True,
            "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
    r = post(client, engine, **body)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 8


def test_each_field_reaches_the_engine(client, engine):
    def text(max_tokens=12, **kw):
        r = post(client, engine, prompt=PROMPT, max_tokens=max_tokens, temperature=0, **kw)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    base = text()["text"]
    ids = engine.tokenize(base)
    k = next(i for i in range(2, len(ids)) if ids.index(ids[i]) == i)
    stopped = text(stop_token_ids=[ids[k]])
    assert stopped["text"] == engine.detokenize(ids[:k]) and stopped["finish_reason"] == "stop"
    assert text(stop_token_ids=[ids[k]], include_stop_str_in_output=True)["text"] == engine.detokenize(ids[:k + 1])
    assert text(stop_token_ids=[ids[k]], min_tokens=12)["finish_reason"] == "length"  # banned until the end
    assert text(repetition_penalty=3.0, max_tokens=24)["text"] != text(max_tokens=24)["text"]
    assert text(min_tokens=100)["finish_reason"] == "length"  # above max_tokens: max_tokens
    for neutral in ({"use_beam_search": False}, {"length_penalty": 1.0}, {"add_special_tokens": True},
                    {"spaces_between_special_tokens": True}, {"skip_special_tokens": True}, {"min_p": 0.0}):
        assert text(**neutral)["text"] == base


@pytest.mark.parametrize("field,value,status", [
    ("repetition_penalty", 0.0, 422), ("repetition_penalty", 11.0, 422), ("min_p", 1.5, 422),
    ("min_p", -0.1, 422), ("min_tokens", -1, 422), ("stop_token_ids", [-1], 422),
    ("stop_token_ids", [10**6], 400), ("skip_special_tokens", 1, 422), ("use_beam_search", True, 422),
    ("length_penalty", 2.0, 422), ("include_stop_str_in_output", "yes", 422),
])
def test_out_of_range_values_are_4xx_naming_the_field(client, engine, field, value, status):
    r = post(client, engine, prompt=PROMPT, max_tokens=2, **{field: value})
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"].split(".")[0] == field


def test_the_served_schema_caps_stop_token_ids_at_the_vocabulary(client, engine):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"]
    assert f'"maximum": {engine.vocab_size - 1}' in __import__("json").dumps(schema["properties"]["stop_token_ids"])
