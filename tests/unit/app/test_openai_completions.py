"""The legacy completions API in full (in-process app, a real Engine behind LocalBackend):
suffix/FIM, prompt forms, n/best_of, echo, logprobs against transformers, streaming,
/tokenize and /detokenize, and the 4xx that name the field."""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.streams import sse_events
from serving.engine.engine import Engine

PROMPT = "def foo(x):\n    return x"


def post(client, engine, **body):
    return client.post("/v1/completions", json={"model": engine.model_name, **body})


def direct_logprobs(engine: Engine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


# ---- fill in the middle -------------------------------------------------------------------

def test_suffix_returns_only_the_middle_of_a_fim_prompt(fim_client, fim_engine):
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    r = post(fim_client, fim_engine, prompt=prefix, suffix=suffix, max_tokens=12, temperature=0)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    expected_ids = fim_engine.encode_prompt(__import__("serving.engine.fim", fromlist=["Infill"]).Infill(prefix, suffix), 12)[0]
    assert r.json()["usage"]["prompt_tokens"] == len(expected_ids)  # the PSM prompt, built server-side
    assert "<fim_" not in choice["text"] and "<|endoftext|>" not in choice["text"]
    same = fim_client.post("/complete", json={"prompt": prefix, "suffix": suffix, "max_new_tokens": 12})
    assert same.status_code == 200 and same.json()["completion"] == choice["text"]
    ids = post(fim_client, fim_engine, prompt=fim_engine.tokenize(prefix), suffix=suffix, max_tokens=12, temperature=0)
    assert ids.json()["choices"][0]["text"] == choice["text"]  # token ids + suffix: the same hole


def test_suffix_on_a_model_trained_without_fim_is_a_400_naming_suffix(client, engine):
    r = post(client, engine, prompt="x = ", suffix="\nprint(x)\n", max_tokens=4)
    assert r.status_code == 400 and r.json()["error"]["field"] == "suffix"
    assert "without fill-in-the-middle" in r.json()["error"]["message"]
    r = client.post("/complete", json={"prompt": "x = ", "suffix": "\nprint(x)\n"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "suffix"
    assert post(client, engine, prompt="x = ", suffix="", max_tokens=2).status_code == 200  # neutral value


# ---- prompt forms, n, best_of -------------------------------------------------------------

def test_prompt_as_text_token_ids_and_lists_gives_a_choice_per_prompt_in_order(client, engine):
    ids_a, ids_b = engine.tokenize(PROMPT), engine.tokenize("import os\n")
    want = [post(client, engine, prompt=p, max_tokens=6, temperature=0).json()["choices"][0]["text"]
            for p in (PROMPT, "import os\n")]
    assert post(client, engine, prompt=ids_a, max_tokens=6, temperature=0).json()["choices"][0]["text"] == want[0]
    for prompt in ([ids_a, ids_b], [PROMPT, "import os\n"]):
        body = post(client, engine, prompt=prompt, max_tokens=6, temperature=0, n=2).json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in body["choices"]] == [want[0], want[0], want[1], want[1]]


def test_best_of_returns_the_n_most_likely_of_its_candidates(client, engine):
    body = dict(prompt=PROMPT, max_tokens=6, temperature=1.0, seed=5, logprobs=0)
    cands = post(client, engine, n=4, **body).json()["choices"]
    best = post(client, engine, n=1, best_of=4, **body).json()["choices"]
    scores = [sum(c["logprobs"]["token_logprobs"]) for c in cands]
    assert len(best) == 1 and best[0]["index"] == 0
    assert best[0]["text"] == cands[scores.index(max(scores))]["text"]


# ---- logprobs and echo --------------------------------------------------------------------

def test_logprobs_match_a_direct_transformers_computation(client, engine):
    r = post(client, engine, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    ids = engine.tokenize(PROMPT) + [engine.tokenize(t)[0] for t in lp["tokens"]]
    ref = direct_logprobs(engine, ids)
    start = len(engine.tokenize(PROMPT))
    for i, (tok, val, top) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])):
        row = ref[start + i - 1]
        assert math.isclose(val, float(row.max()), abs_tol=1e-4)  # greedy: the most likely token
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(float(row.max()), abs=1e-4)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_the_prompt(client, engine, max_tokens):
    r = post(client, engine, prompt=PROMPT, max_tokens=max_tokens, echo=True, logprobs=1, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    choice, ids = body["choices"][0], engine.tokenize(PROMPT)
    lp = choice["logprobs"]
    assert choice["text"].startswith(PROMPT) and (max_tokens or choice["text"] == PROMPT)
    assert len(lp["tokens"]) == len(ids) + max_tokens and lp["token_logprobs"][0] is None
    ref = direct_logprobs(engine, ids)
    for t in range(1, len(ids)):
        assert math.isclose(lp["token_logprobs"][t], float(ref[t - 1, ids[t]]), abs_tol=1e-4)
    assert body["usage"]["completion_tokens"] == max_tokens


# ---- streaming ----------------------------------------------------------------------------

def test_stream_with_logprobs_usage_and_done(client, engine):
    r = post(client, engine, prompt=PROMPT, max_tokens=8, temperature=0, stream=True, logprobs=1,
             stream_options={"include_usage": True}, user="someone", stop=[f"@@{i}@@" for i in range(20)],
             presence_penalty=0.0, frequency_penalty=0.0)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    chunks = [c for e in events[:-2] for c in e["choices"]]
    text = "".join(c["text"] for c in chunks)
    assert text == post(client, engine, prompt=PROMPT, max_tokens=8, temperature=0).json()["choices"][0]["text"]
    assert "".join(t for c in chunks for t in c["logprobs"]["tokens"]) == text
    offsets = [o for c in chunks for o in c["logprobs"]["text_offset"]]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_combinations_the_schema_allows_are_served(client, engine):
    """best_of below n is n; max_tokens 0 without echo generates nothing; echo + logprobs
    streams once the prompt is scored; a suffix after token ids continues their text."""
    two = post(client, engine, prompt=PROMPT, n=2, best_of=1, max_tokens=3, seed=1).json()["choices"]
    assert [c["index"] for c in two] == [0, 1]
    none = post(client, engine, prompt=PROMPT, max_tokens=0).json()
    assert none["choices"][0]["text"] == "" and none["usage"]["completion_tokens"] == 0
    r = post(client, engine, prompt=PROMPT, max_tokens=2, echo=True, logprobs=1, stream=True, temperature=0,
             stream_options={"include_usage": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 2
    choice = events[0]["choices"][0]
    whole = post(client, engine, prompt=PROMPT, max_tokens=2, echo=True, logprobs=1, temperature=0).json()
    assert choice["text"] == whole["choices"][0]["text"] and choice["logprobs"] == whole["choices"][0]["logprobs"]


# ---- tokenize / detokenize ----------------------------------------------------------------

def test_tokenize_and_detokenize_with_the_models_tokenizer(client, engine):
    r = client.post("/tokenize", json={"model": engine.model_name, "prompt": PROMPT})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == engine.tokenizer(PROMPT)["input_ids"] and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine.context_length
    back = client.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}
    bad = client.post("/detokenize", json={"tokens": [engine.vocab_size]})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "tokens"


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,field", [
    ({"prompt": [1, 2, 10**6]}, 400, "prompt"),
    ({"prompt": [[1, 2], [-1]]}, 422, "prompt"),
    ({"prompt": []}, 422, "prompt"),
    ({"prompt": [[]]}, 422, "prompt"),
    ({"prompt": "x", "logprobs": 6}, 422, "logprobs"),
    ({"prompt": "x", "echo": True, "best_of": 2}, 400, "best_of"),
    ({"prompt": "x", "stream": True, "best_of": 2}, 400, "best_of"),
    ({"prompt": "x", "echo": True, "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x", "presence_penalty": 3}, 422, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, 422, "logit_bias"),
])
def test_bad_requests_name_the_field(client, engine, body, status, field):
    r = post(client, engine, **body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
