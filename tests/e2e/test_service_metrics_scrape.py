"""Prometheus metrics scraped from a real Serve deployment agree with the load sent."""

from __future__ import annotations

import concurrent.futures as cf
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families


pytestmark = pytest.mark.slow
P = "ray_codecomplete_"


def samples(text: str) -> list[tuple[str, dict, float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith(P)]


def total(rows, name: str, **labels) -> float:
    return sum(v for n, lab, v in rows if n == name and all(lab.get(k) == v2 for k, v2 in labels.items()))


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    from tests.support.live_service import live_service

    with live_service(tiny_checkpoint) as s:
        yield s


@pytest.mark.timeout(600)
def test_scraped_metrics_match_the_load(service):
    url = service.url
    usage = []  # (prompt, completion) tokens of every generation the server reported

    def complete(i: int) -> None:
        r = requests.post(url + "/complete", json={"prompt": f"def f{i}(x):\n", "max_new_tokens": 8 + i % 5},
                          timeout=120)
        assert r.status_code == 200, r.text
        usage.append((r.json()["usage"]["prompt_tokens"], r.json()["usage"]["completion_tokens"]))

    for i in range(3):
        complete(i)
    with requests.post(url + "/complete", json={"prompt": "import os\n", "max_new_tokens": 12, "stream": True},
                       stream=True, timeout=120) as r:
        last = [line for line in r.iter_lines(decode_unicode=True) if line.startswith("data: {")][-1]
    import json

    u = json.loads(last[6:])["usage"]
    usage.append((u["prompt_tokens"], u["completion_tokens"]))
    r = requests.post(url + "/v1/completions", json={"model": requests.get(url + "/v1/models", timeout=30)
                                                     .json()["data"][0]["id"], "prompt": "x = ", "max_tokens": 5},
                      timeout=120).json()
    usage.append((r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"]))
    assert requests.post(url + "/complete", json={"prompt": "x", "max_new_tokens": 0}, timeout=30).status_code == 422
    with cf.ThreadPoolExecutor(16) as pool:  # a burst: requests share the decode batch
        list(pool.map(complete, range(3, 19)))
    n_complete = 3 + 1 + 16  # 200s on /complete

    rows, deadline, missing = [], time.monotonic() + 120, ["nothing scraped yet"]
    while time.monotonic() < deadline:
        time.sleep(3)
        try:
            rows = samples(requests.get(service.metrics_url, timeout=10).text)
        except requests.RequestException as e:
            missing = [f"scrape failed: {e}"]
            continue
        want = {"requests /complete 200": (total(rows, P + "requests_total", route="/complete", status="200"),
                                           n_complete),
                "requests /complete 422": (total(rows, P + "requests_total", route="/complete", status="422"), 1),
                "requests /v1/completions 200": (total(rows, P + "requests_total", route="/v1/completions",
                                                       status="200"), 1),
                "latency count /complete": (total(rows, P + "request_latency_seconds_count", route="/complete"),
                                            n_complete + 1),
                "prompt tokens": (total(rows, P + "prompt_tokens_total"), sum(p for p, _ in usage)),
                "completion tokens": (total(rows, P + "completion_tokens_total"), sum(c for _, c in usage)),
                "ttft count": (total(rows, P + "time_to_first_token_seconds_count"), len(usage))}
        missing = [f"{k}: {got} != {exp}" for k, (got, exp) in want.items() if got != exp]
        if not missing:
            break
    assert not missing, f"metrics at {service.metrics_url} after 120 s: {missing}"

    # Serve's tags are on every series: a dashboard can split by application and replica.
    (name, labels, _), *_ = [r for r in rows if r[0] == P + "requests_total"]
    assert labels["application"] == "complete" and labels["deployment"] == "Completer" and labels["replica"]
    assert total(rows, P + "requests_total", route="/health", status="200") >= 1  # the start-up probes
    # Latency and TTFT are plausible: every request under a minute, first tokens before the end.
    assert total(rows, P + "request_latency_seconds_bucket", route="/complete", le="60.0") == n_complete + 1
    assert 0 < total(rows, P + "time_to_first_token_seconds_bucket", le="10.0") <= len(usage)
    # The burst shared the decode batch: more row-steps than steps; idle now, so the gauges are 0.
    steps, row_steps = total(rows, P + "decode_steps_total"), total(rows, P + "decode_row_steps_total")
    assert steps > 0 and row_steps > steps
    names = {n for n, _, _ in rows}
    assert {P + "decode_batch_rows", P + "queue_depth"} <= names
    assert total(rows, P + "decode_batch_rows") == 0 and total(rows, P + "queue_depth") == 0
    print(f"decode: {steps:.0f} steps, mean batch {row_steps / steps:.2f} rows")
