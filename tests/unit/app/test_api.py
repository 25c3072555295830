"""The FastAPI app in-process (a real Engine behind LocalBackend, no Ray): routes, errors, auth.

The same app runs inside the Serve replica; tests/test_serving.py checks it there over real HTTP.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from app.api import build_app
from app.schemas import MAX_BODY_BYTES
from tests.support.streams import sse_events
from serving.local import LocalBackend


def test_complete_matches_engine(client, engine):
    r = client.post("/complete", json={"prompt": "def f(x):", "max_new_tokens": 12})
    assert r.status_code == 200
    body = r.json()
    ref = engine.complete("def f(x):", max_new_tokens=12)
    assert body == {"completion": ref.text, "finish_reason": ref.finish_reason, "truncated": False,
                    "usage": {"prompt_tokens": ref.prompt_tokens, "completion_tokens": ref.completion_tokens},
                    "model": engine.model_name}


def test_complete_stream_events(client, engine):
    r = client.post("/complete", json={"prompt": "import os\n", "max_new_tokens": 10, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "finish_reason" in events[-2]
    text = "".join(e["text"] for e in events[:-1])
    assert text == events[-2]["completion"] == engine.complete("import os\n", max_new_tokens=10).text


def test_openai_completions_shape(client, engine):
    r = client.post("/v1/completions", json={"model": engine.model_name, "prompt": ["a", "b"], "n": 2,
                                              "max_tokens": 5, "temperature": 0.8, "seed": 1})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] <= 20
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == engine.model_name and models["data"][0]["max_model_len"] == 128


@pytest.mark.parametrize("path", ["/complete", "/v1/completions"])
def test_ignore_eos_reaches_the_engine_on_both_routes(client, engine, path):
    """With the model's next token made its end-of-text, a request ends at once unless it
    sends ignore_eos (vLLM's extension), which decodes to its length."""
    first = engine.tokenizer(engine.complete("def f(x):", max_new_tokens=1).text)["input_ids"][0]
    native = path == "/complete"
    body = ({"prompt": "def f(x):", "max_new_tokens": 6} if native
            else {"model": engine.model_name, "prompt": "def f(x):", "max_tokens": 6, "temperature": 0})
    saved = engine.eos_token_id
    engine.eos_token_id = first
    try:
        got = [client.post(path, json={**body, "ignore_eos": flag}).json() for flag in (False, True)]
    finally:
        engine.eos_token_id = saved
    finish = [g["finish_reason"] if native else g["choices"][0]["finish_reason"] for g in got]
    assert finish == (["eos", "length"] if native else ["stop", "length"])
    assert [g["usage"]["completion_tokens"] for g in got] == [1, 6]


def test_openai_stream_with_usage(client, engine):
    r = client.post("/v1/completions", json={"model": engine.model_name, "prompt": "x", "max_tokens": 6,
                                              "temperature": 0, "stream": True,
                                              "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] >= 1
    assert events[-3]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == engine.complete("x", max_new_tokens=6).text


@pytest.mark.parametrize("path, kwargs, status, field", [
    ("/complete", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "body"),
    ("/complete", {"content": b'{"prompt": "x"}', "headers": {"content-type": "text/plain"}}, 415, "body"),
    ("/complete", {"json": ["prompt"]}, 422, "body"),
    ("/complete", {"content": b"", "headers": {"content-type": "application/json"}}, 400, "body"),
    ("/complete", {"json": {"prompt": "x", "stop": [""]}}, 422, "stop"),
    ("/complete", {"json": {"prompt": "x", "max_new_tokens": 128}}, 422, "max_new_tokens"),
    ("/complete", {"json": {"prompt": "x", "temperature": "warm"}}, 422, "temperature"),
    ("/complete", {"json": {"prompt": "x", "bogus": 1}}, 422, "bogus"),
    ("/complete", {"json": {"prompt": "x", "ignore_eos": 1}}, 422, "ignore_eos"),  # strict: 1 is not true
    ("/complete", {"json": {"prompt": "x" * (MAX_BODY_BYTES + 1)}}, 413, "body"),
    ("/v1/completions", {"json": {"model": "other", "prompt": "x"}}, 404, "model"),
    ("/v1/completions", {"json": {"model": "MODEL", "prompt": "x", "logit_bias": {"1": 1.0}}}, 422, "logit_bias"),
    ("/v1/completions", {"json": {"model": "MODEL", "prompt": "x", "max_tokens": 500}}, 422, "max_tokens"),
])
def test_bad_requests_are_4xx_naming_the_field(client, engine, path, kwargs, status, field):
    if "json" in kwargs and isinstance(kwargs["json"], dict) and kwargs["json"].get("model") == "MODEL":
        kwargs = {"json": {**kwargs["json"], "model": engine.model_name}}
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field == err["param"] and err["code"] == status and err["message"]


def test_chunked_body_over_the_cap_is_413(client):
    def chunks():
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536
    r = client.post("/complete", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"


def test_a_body_that_never_arrives_is_a_408_naming_body(engine, monkeypatch):
    """A real server and a client that sends its headers and part of a body, then stalls:
    a 408 naming `body` after the timeout, not a request that waits for ever."""
    import socket
    import threading
    import time

    import uvicorn

    from app import errors

    monkeypatch.setattr(errors, "BODY_TIMEOUT_S", 0.5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(LocalBackend(engine)), host="127.0.0.1", port=port,
                                           log_level="error"))
    runner = threading.Thread(target=server.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start within 30 s"
        with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
            c.sendall(b"POST /complete HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            t0, reply = time.monotonic(), b""
            while b"}}" not in reply:
                chunk = c.recv(4096)
                if not chunk:
                    break
                reply += chunk
            waited = time.monotonic() - t0
    finally:
        server.should_exit = True
        runner.join(10)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(body)["error"]["field"] == "body" and 0.4 < waited < 10


def test_unknown_route_and_method_are_json_4xx(client):
    assert client.get("/nope").json()["error"]["code"] == 404
    r = client.get("/complete")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_auth_on_guards_all_but_health(engine):
    c = TestClient(build_app(LocalBackend(engine), api_key="s3cret"))
    assert c.get("/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        r = c.post("/complete", json={"prompt": "x", "max_new_tokens": 1}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["field"] == "authorization"
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models", headers=headers).status_code == 401
    ok = {"Authorization": "Bearer s3cret"}
    assert c.post("/complete", json={"prompt": "x", "max_new_tokens": 1}, headers=ok).status_code == 200
    assert c.get("/v1/models", headers=ok).status_code == 200


def test_openapi_documents_statuses_and_model_limits(client, engine):
    schema = client.get("/openapi.json").json()
    ops = {(m.upper(), p): op for p, item in schema["paths"].items() for m, op in item.items()}
    assert set(ops["POST", "/complete"]["responses"]) == {"200", "400", "408", "413", "415", "422", "500", "503"}
    assert set(ops["POST", "/v1/completions"]["responses"]) == {"200", "400", "404", "408", "413", "415", "422",
                                                                 "500", "503"}
    assert set(ops["GET", "/health"]["responses"]) == {"200", "503"}
    for path in ("/complete", "/v1/completions"):  # overload: the client is told when to come back
        assert "Retry-After" in ops["POST", path]["responses"]["503"]["headers"]
    err = ops["POST", "/complete"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert err == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "text/event-stream" in ops["POST", "/complete"]["responses"]["200"]["content"]
    req = schema["components"]["schemas"]
    assert req["CompleteRequest"]["properties"]["max_new_tokens"]["maximum"] == engine.context_length - 1
    assert req["CompletionRequest"]["properties"]["model"]["enum"] == [engine.model_name]
    assert "security" not in ops["POST", "/complete"]  # auth off: nothing to send
    secured = TestClient(build_app(LocalBackend(engine), api_key="k")).get("/openapi.json").json()
    assert "401" in secured["paths"]["/complete"]["post"]["responses"]
    assert secured["components"]["securitySchemes"] == {"HTTPBearer": {"type": "http", "scheme": "bearer"}}


def test_empty_prompt_completes(client):
    r = client.post("/complete", json={"prompt": "", "max_new_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
