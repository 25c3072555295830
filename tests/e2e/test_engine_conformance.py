"""One API conformance suite, run against both engines (native and vLLM) on the same FIM
checkpoint, each behind the real app: the native engine under a real uvicorn, vLLM in the
project's own Ray Serve replica deployed from serving/config.yaml as shipped with `engine:
vllm` (its AsyncLLM's engine process spawned from the Ray actor; one vLLM start serves the
suite and the replica's checks). What /complete and /v1/completions promise (greedy text,
streaming, n and seeds, best_of, echo and logprobs, stop strings and tokens, suffix / FIM,
vLLM's sampling fields, the error contract, auth) holds whichever engine runs. Greedy
completions in fp32 are held to the native engine's own, token for token."""

from __future__ import annotations

import pytest
import requests

from tests.support.engines import VLLM_APP, open_native, served, vllm_replica
from tests.support.streams import sse_events

pytestmark = pytest.mark.slow

KEY = "conf-key-9a1"
PROMPT = "def foo(x):\n    return x"
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module", params=["native", "vllm"])
def api(request, tiny_fim_checkpoint):
    """(URL, model name, the engine's stats()) of the service on that engine."""
    if request.param == "vllm":
        from ray import serve

        with vllm_replica(tiny_fim_checkpoint, api_key=KEY) as url:
            yield url, model_name(url), lambda: serve.get_app_handle(VLLM_APP).stats.remote().result(timeout_s=30)
        return
    serving = open_native(tiny_fim_checkpoint)
    try:
        with served(serving, api_key=KEY) as url:
            yield url, serving.model_name, serving.stats
    finally:
        serving.shutdown()


def model_name(url: str) -> str:
    r = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["id"]


@pytest.fixture(scope="module")
def reference(fim_engine):
    """The native engine in-process: what a greedy completion must be."""
    return fim_engine


def post(api, path, body, key=KEY):
    url, model, _ = api
    if path == "/v1/completions":
        body = {"model": model, **body}
    return requests.post(url + path, json=body, timeout=120,
                         headers={"Authorization": f"Bearer {key}"} if key else {})


def test_greedy_completions_are_the_native_engines(api, reference):
    want = reference.complete(PROMPT, max_new_tokens=16)
    r = post(api, "/complete", {"prompt": PROMPT, "max_new_tokens": 16})
    assert r.status_code == 200, r.text
    assert r.json()["completion"] == want.text and r.json()["finish_reason"] == want.finish_reason
    assert r.json()["usage"] == {"prompt_tokens": want.prompt_tokens, "completion_tokens": want.completion_tokens}
    r = post(api, "/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0})
    assert r.json()["choices"][0]["text"] == want.text


def test_suffix_fills_the_middle_from_the_projects_fim_prompt(api, reference):
    from serving.engine.params import Infill

    want = reference.complete(Infill(PREFIX, SUFFIX), max_new_tokens=12)
    r = post(api, "/v1/completions", {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want.text
    assert r.json()["usage"]["prompt_tokens"] == want.prompt_tokens


def test_streaming_sends_the_same_text_then_usage_and_done(api):
    whole = post(api, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}).json()
    r = post(api, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True,
                                      "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["usage"] == whole["usage"]
    assert "".join(c["text"] for e in events[:-2] for c in e["choices"]) == whole["choices"][0]["text"]
    r = post(api, "/complete", {"prompt": PROMPT, "max_new_tokens": 12, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")


def test_seeds_reproduce_and_n_samples_differ(api):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 11, "n": 3}
    a, b = post(api, "/v1/completions", body).json(), post(api, "/v1/completions", body).json()
    texts = [c["text"] for c in a["choices"]]
    assert texts == [c["text"] for c in b["choices"]] and len(set(texts)) > 1
    best = post(api, "/v1/completions", {**body, "n": 1, "best_of": 3}).json()  # vLLM V1 has no best_of: done on top
    assert len(best["choices"]) == 1 and best["choices"][0]["text"] in texts


def test_echo_and_logprobs_agree_with_the_native_engines(api, reference):
    r = post(api, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "echo": True,
                                      "logprobs": 2}).json()
    want = reference.complete(PROMPT, max_new_tokens=6, logprobs=2, prompt_logprobs=2)
    choice = r["choices"][0]
    assert choice["text"] == PROMPT + want.text
    lp = choice["logprobs"]
    entries = want.prompt_logprobs + want.logprobs
    assert lp["tokens"] == [e.token for e in entries] and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([e.logprob for e in entries[1:]], abs=1e-3)
    for got, e in zip(lp["top_logprobs"][1:], entries[1:]):
        assert got.keys() == e.top.keys()


def test_stop_strings_stop_tokens_and_vllms_fields(api, reference):
    base = reference.complete(PROMPT, max_new_tokens=16)
    stop = base.text[3:5]
    r = post(api, "/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stop": [stop]}).json()
    assert r["choices"][0]["text"] == base.text[:base.text.find(stop)] and r["choices"][0]["finish_reason"] == "stop"
    kept = post(api, "/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stop": [stop],
                                         "include_stop_str_in_output": True}).json()
    assert kept["choices"][0]["text"] == base.text[:base.text.find(stop) + len(stop)]
    # The ids the model generated, not the text re-tokenized: BPE merges a run such as "\n\n\n"
    # into tokens a model that emits "\n" one at a time never produces, and that stop never fires.
    ids = [e.id for e in reference.complete(PROMPT, max_new_tokens=16, logprobs=0).logprobs]
    k = next((i for i in range(1, len(ids)) if ids.index(ids[i]) == i), 0)  # a token's first appearance
    r = post(api, "/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                                      "stop_token_ids": [ids[k]]}).json()
    assert r["choices"][0]["text"] == reference.detokenize(ids[:k])
    want = reference.complete(PROMPT, max_new_tokens=12, repetition_penalty=2.0, min_tokens=12)
    r = post(api, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                      "repetition_penalty": 2.0, "min_tokens": 12}).json()
    assert r["choices"][0]["text"] == want.text
    bench = post(api, "/v1/completions", {"prompt": PROMPT, "repetition_penalty": 1.0, "max_tokens": 8,
                                          "logprobs": None, "stream": True, "ignore_eos": True,
                                          "stream_options": {"include_usage": True}})
    assert bench.status_code == 200 and sse_events(bench.text)[-2]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("path,body,key,status,field", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}, KEY, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_token": 3}, KEY, 422, "max_token"),
    ("/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, KEY, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "min_p": 2.0}, KEY, 422, "min_p"),
    ("/complete", {"prompt": "x"}, None, 401, None),
    ("/complete", {"prompt": "x"}, "wrong", 401, None),
])
def test_the_error_contract(api, path, body, key, status, field):
    r = post(api, path, body, key=key)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == status
    if field:
        assert r.json()["error"]["field"] == field


def test_the_engine_counted_the_suites_requests_and_holds_no_rows(api, reference):
    """Last in the module: after every request above, none is still decoding, and the engine
    counted its work (vLLM: finished requests; native: decode steps)."""
    url, model, stats = api
    assert model == reference.model_name  # the same checkpoint behind both
    s = stats()
    assert s["live_rows"] == 0, s
    if "requests" in s:  # vLLM's replica
        assert s["requests"] >= 10, s
    else:
        assert s["steps"] > 0, s
