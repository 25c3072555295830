"""The request bodies real editor plug-ins send, replayed byte for byte over real HTTP
(uvicorn, the project's app and Engine) against a FIM-trained checkpoint.

Continue (core/llm/llms/OpenAI.ts `_legacystreamComplete`, autocomplete with provider
"openai"): it renders the FIM prompt itself with its default template (model ids that match
none of its families, e.g. "codecomplete-fim"; an id containing "gpt" switches to a chat
prompt) and sends it raw, streaming, with the template's stop words plus its own.
Tabby (crates/http-api-bindings/src/completion/openai.rs, kind "openai/completion"): prefix
as `prompt`, `suffix`, max_tokens, temperature, stream, presence_penalty.
"""

from __future__ import annotations

import json

import httpx
import pytest

from app.api import build_app
from tests.support.servers import uvicorn_server
from serving.engine.engine import Engine
from serving.local import LocalBackend

MODEL = "codecomplete-fim"
PREFIX = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        "
SUFFIX = "\n    return lines\n\n\nprint(read_lines(os.devnull))\n"
CONTINUE_STOPS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "</fim_middle>",
                  "</code>", "\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8", "```"]


def continue_body(prefix: str, suffix: str) -> dict:
    """Continue's stableCodeFimTemplate prompt; JSON.stringify drops its undefined options
    (top_p, penalties), temperature is its autocomplete default 0.01."""
    return {"model": MODEL, "max_tokens": 48, "temperature": 0.01, "stream": True, "stop": CONTINUE_STOPS,
            "prompt": f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"}


def tabby_body(prefix: str, suffix) -> dict:
    """serde's serialisation of Tabby's CompletionRequest (f32 0.1 -> 0.10000000149011612)."""
    return {"model": MODEL, "prompt": prefix, "suffix": suffix, "max_tokens": 64,
            "temperature": 0.10000000149011612, "stream": True, "presence_penalty": 0.0}


@pytest.fixture(scope="module")
def engine(tiny_fim_checkpoint) -> Engine:
    return Engine(tiny_fim_checkpoint, num_threads=1, model_name=MODEL)


@pytest.fixture(scope="module")
def server(engine):
    with uvicorn_server(build_app(LocalBackend(engine))) as url:
        yield url


def stream(url: str, body: dict) -> tuple[list, str]:
    """(SSE payloads, content type) of a streamed POST /v1/completions."""
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        kind = r.headers["content-type"]
    return [e if e == "[DONE]" else json.loads(e) for e in events], kind


def text_of(events: list) -> str:
    return "".join(e["choices"][0]["text"] for e in events if e != "[DONE]" and e["choices"])


def test_continue_autocomplete_body_streams_the_middle(server, engine):
    events, kind = stream(server, continue_body(PREFIX, SUFFIX))
    assert kind.startswith("text/event-stream") and events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    text = text_of(events)
    assert not any(s in text for s in CONTINUE_STOPS)
    # the raw FIM prompt is served exactly like prompt + suffix (the same truncation, the same middle)
    same = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": PREFIX, "suffix": SUFFIX,
                                                        "max_tokens": 48, "temperature": 0, "stop": CONTINUE_STOPS})
    greedy = stream(server, {**continue_body(PREFIX, SUFFIX), "temperature": 0})[0]
    assert same.status_code == 200 and text_of(greedy) == same.json()["choices"][0]["text"]


def test_continue_body_longer_than_the_context_keeps_both_sides(server, engine):
    long_prefix = "".join(f"x{i} = {i}\n" for i in range(200)) + PREFIX
    long_suffix = SUFFIX + "".join(f"y{i} = {i}\n" for i in range(200))
    greedy = stream(server, {**continue_body(long_prefix, long_suffix), "temperature": 0})[0]
    same = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": long_prefix, "suffix": long_suffix,
                                                        "max_tokens": 48, "temperature": 0, "stop": CONTINUE_STOPS})
    assert text_of(greedy) == same.json()["choices"][0]["text"]


@pytest.mark.parametrize("suffix", [SUFFIX, None])
def test_tabby_openai_completion_body(server, suffix):
    events, _ = stream(server, tabby_body(PREFIX, suffix))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1]]
    # Tabby reads choices[0].text of every event and stops at the first finish_reason
    assert all(len(e["choices"]) == 1 and isinstance(e["choices"][0]["text"], str) for e in chunks)
    assert [e["choices"][0]["finish_reason"] is not None for e in chunks].index(True) == len(chunks) - 1
    assert "<fim_" not in text_of(events)


def test_tabby_against_a_model_without_fim_gets_a_400_naming_suffix(tiny_checkpoint):
    with uvicorn_server(build_app(LocalBackend(Engine(tiny_checkpoint, num_threads=1, model_name=MODEL)))) as url:
        r = httpx.post(url + "/v1/completions", json=tabby_body(PREFIX, SUFFIX))
    assert r.status_code == 400 and r.json()["error"]["field"] == "suffix"
