"""Load shedding (app/admission.py) over real HTTP: the app under uvicorn, a real Engine behind
LocalBackend, real clients. A replica full of rows answers the next request 503 with
Retry-After at once, in the OpenAI error shape; places come back when answers end, and when
a client hangs up, even one whose request was still waiting for the batch."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.api import build_app
from serving.local import LocalBackend
from tests.support import engine_faults
from tests.support.servers import uvicorn_server

LONG = {"max_tokens": 100, "ignore_eos": True, "temperature": 0, "stream": True}


SLOW = engine_faults.DEFAULT_MARKER + "slow"  # each step of a batch holding it lasts 50 ms longer


@pytest.fixture()
def full_service(engine):
    """A service with room for 2 decoding rows and 1 waiting: capacity 3. Held requests are
    slowed (tests/support/engine_faults.py), so they stay in flight while the test looks."""
    engine_faults.install(engine)
    backend = LocalBackend(engine, max_rows=2, max_queued=1, retry_after_s=2)
    app = build_app(backend)
    try:
        with uvicorn_server(app) as url:
            yield url, app.state.admission, backend
    finally:
        engine_faults.uninstall(engine)


class _Open:
    """A streaming completion that has been admitted (its first event arrived), held open."""

    def __init__(self, http: httpx.Client, url: str, model: str, decoding: bool = True):
        self.cm = http.stream("POST", f"{url}/v1/completions", json={"model": model, "prompt": f"def f(x):  {SLOW}", **LONG})
        r = self.cm.__enter__()
        assert r.status_code == 200  # the headers come at once, decoding or waiting
        self.lines = r.iter_lines()  # kept: dropping the iterator would close the response
        if decoding:  # its first tokens: it holds a row of the batch
            assert next(self.lines).startswith("data: ")

    def __exit__(self, *exc) -> None:  # hang up
        self.cm.__exit__(*exc)


def _fill(http: httpx.Client, url: str, model: str) -> list[_Open]:
    """2 requests decoding and 1 waiting for the batch: the service is full."""
    return [_Open(http, url, model), _Open(http, url, model), _Open(http, url, model, decoding=False)]


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_past_capacity_a_request_gets_a_fast_503_with_retry_after(full_service, engine):
    url, gate, _ = full_service
    with httpx.Client(timeout=30) as http:
        streams = _fill(http, url, engine.model_name)
        _wait(lambda: gate.held == 3)
        for body, path in (({"model": engine.model_name, "prompt": "x", "max_tokens": 4}, "/v1/completions"),
                           ({"model": engine.model_name, "prompt": "x", "max_tokens": 4, "stream": True},
                            "/v1/completions"),
                           ({"prompt": "x", "max_new_tokens": 4}, "/complete")):
            t0 = time.perf_counter()
            r = http.post(f"{url}{path}", json=body)
            assert r.status_code == 503, r.text
            assert time.perf_counter() - t0 < 2.0  # answered, not queued
            assert r.headers["retry-after"] == "2"
            err = r.json()["error"]
            assert err["type"] == "service_unavailable" and err["code"] == 503 and "overloaded" in err["message"]
        assert gate.rejected == 3
        # `n: 2` would take two places: refused too, while one place would be free
        streams.pop().__exit__(None, None, None)
        _wait(lambda: gate.held == 2)
        r = http.post(f"{url}/v1/completions", json={"model": engine.model_name, "prompt": "x", "max_tokens": 2, "n": 2})
        assert r.status_code == 503
        r = http.post(f"{url}/v1/completions", json={"model": engine.model_name, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
        for cm in streams:
            cm.__exit__(None, None, None)
        _wait(lambda: gate.held == 0)  # every place given back


def test_a_client_that_hangs_up_while_waiting_frees_its_place_and_its_row(full_service, engine):
    url, gate, backend = full_service
    with httpx.Client(timeout=30) as http:
        running = [_Open(http, url, engine.model_name) for _ in range(2)]  # the batch is full
        cm = http.stream("POST", f"{url}/v1/completions",
                         json={"model": engine.model_name, "prompt": f"import os  {SLOW}", **LONG})
        r = cm.__enter__()  # headers come at once; its row waits for the batch
        assert r.status_code == 200
        _wait(lambda: gate.held == 3)
        steps_before, cancelled_before = backend.decoder.steps, backend.decoder.cancelled
        cm.__exit__(None, None, None)  # hang up while waiting
        _wait(lambda: gate.held == 2)
        _wait(lambda: backend.decoder.cancelled == cancelled_before + 1)  # dropped before its prefill
        assert backend.decoder.max_rows_seen <= 2 and backend.decoder.steps > steps_before
        for c in running:
            c.__exit__(None, None, None)
        _wait(lambda: gate.held == 0)


def test_the_openai_client_sees_an_overloaded_server_and_retries_it(full_service, engine):
    """The field's client raises its typed 5xx error with our message, and by default retries
    a 503 by itself (honouring Retry-After): once places are free, its retry succeeds."""
    import openai

    url, gate, _ = full_service
    with httpx.Client(timeout=30) as http:
        streams = _fill(http, url, engine.model_name)
        _wait(lambda: gate.held == 3)
        once = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            once.completions.create(model=engine.model_name, prompt="x", max_tokens=2)
        assert e.value.status_code == 503 and "overloaded" in str(e.value)
        rejected = gate.rejected
        retrying = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=3)
        with ThreadPoolExecutor(1) as pool:
            out = pool.submit(retrying.completions.create, model=engine.model_name, prompt="x", max_tokens=2)
            _wait(lambda: gate.rejected > rejected)  # its first try was refused; it backs off
            for cm in streams:  # the places come free while it waits
                cm.__exit__(None, None, None)
            assert out.result(timeout=30).choices[0].finish_reason in ("length", "stop")


def test_without_a_bound_the_same_request_waits_instead(engine):
    """The fault the gate answers: with max_queued -1 (Serve's default, no bound) a request
    past the same capacity is taken in and waits behind the others, however many there are."""
    engine_faults.install(engine)
    backend = LocalBackend(engine, max_rows=2, max_queued=-1)
    app = build_app(backend)
    try:
        with uvicorn_server(app) as url, httpx.Client(timeout=30) as http:
            streams = _fill(http, url, engine.model_name) + [_Open(http, url, engine.model_name, decoding=False)]
            _wait(lambda: app.state.admission.held == 4)  # the 4th is in: no 503, it queues
            assert app.state.admission.rejected == 0
            for cm in streams:
                cm.__exit__(None, None, None)
            _wait(lambda: app.state.admission.held == 0)
    finally:
        engine_faults.uninstall(engine)
