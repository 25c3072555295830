"""A small, bounded HTTP load generator for the service (used by tests and benchmarks/serve.py).

Plain `http.client` with one keep-alive connection per worker thread: the client should cost
as little CPU as possible, because on a 2-core machine it shares the cores with the server.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlparse


@dataclass
class Result:
    status: int  # 0: no HTTP answer (connection refused / reset / timeout)
    latency_s: float
    completion_tokens: int = 0
    error: Optional[str] = None
    started: float = 0.0
    index: int = -1  # which request (make_body's argument)
    text: str = ""  # the completion, for checks on what came back
    ttft_s: Optional[float] = None  # streamed requests: time to the first event with text


class Client:
    """One keep-alive connection; reconnects after a failure."""

    def __init__(self, url: str, timeout_s: float = 60.0, headers: Optional[dict[str, str]] = None):
        u = urlparse(url)
        self.host, self.port, self.prefix = u.hostname or "127.0.0.1", u.port or 80, u.path.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.conn: Optional[http.client.HTTPConnection] = None

    def request(self, method: str, path: str, body: Optional[dict] = None) -> tuple[int, dict]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            data = None if body is None else json.dumps(body).encode()
            self.conn.request(method, self.prefix + path, body=data, headers=self.headers)
            resp = self.conn.getresponse()
            raw = resp.read()
        except Exception:
            self.close()
            raise
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = {"raw": raw[:200].decode(errors="replace")}
        return resp.status, payload

    def stream(self, path: str, body: dict) -> tuple[int, Optional[float], dict]:
        """POST a `stream: true` body; (status, seconds to the first text event, final event)."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        t0 = time.perf_counter()
        first, final = None, {}
        try:
            self.conn.request("POST", self.prefix + path, body=json.dumps(body).encode(), headers=self.headers)
            resp = self.conn.getresponse()
            if resp.status != 200:
                raw = resp.read()
                return resp.status, None, json.loads(raw) if raw else {}
            for line in resp:  # SSE: "data: {...}" lines, "[DONE]" last
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                # /complete's events carry "text"; /v1/completions' carry it per choice
                if first is None and (event.get("text") or any(c.get("text") for c in event.get("choices") or ())):
                    first = time.perf_counter() - t0
                final = event
            resp.read()  # the chunked terminator, so the connection can be reused
        except Exception:
            self.close()
            raise
        return 200, first, final

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def timed(client: Client, path: str, body: dict, index: int = -1) -> Result:
    t0 = time.perf_counter()
    try:
        status, payload = client.request("POST", path, body)
    except Exception as e:  # no answer at all
        return Result(0, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}", started=t0, index=index)
    tokens = payload.get("usage", {}).get("completion_tokens", 0) if status == 200 else 0
    err = None if status == 200 else json.dumps(payload)[:300]
    return Result(status, time.perf_counter() - t0, tokens, err, started=t0, index=index,
                  text=payload.get("completion", "") if status == 200 else "")


def timed_stream(client: Client, path: str, body: dict, index: int = -1) -> Result:
    """A streamed /complete request: latency to the last event, and time to the first text."""
    t0 = time.perf_counter()
    try:
        status, first, final = client.stream(path, {**body, "stream": True})
    except Exception as e:
        return Result(0, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}", started=t0, index=index)
    ok = status == 200 and "error" not in final
    return Result(status if ok or status != 200 else 500, time.perf_counter() - t0,
                  final.get("usage", {}).get("completion_tokens", 0) if ok else 0,
                  None if ok else json.dumps(final)[:300], started=t0, index=index,
                  text=final.get("completion", "") if ok else "", ttft_s=first)


def run_load(url: str, make_body: Callable[[int], dict], n_requests: int, concurrency: int,
             path: str = "/complete", headers: Optional[dict[str, str]] = None,
             stop: Optional[threading.Event] = None, timeout_s: float = 60.0,
             stream: bool = False) -> tuple[list[Result], float]:
    """Send n_requests (request i gets make_body(i)) with `concurrency` workers; (results, wall seconds).

    With `stop`, workers also end early once it is set (for open-ended background load).
    With `stream`, requests are streamed and each Result has its time to first token.
    """
    send = timed_stream if stream else timed
    counter = iter(range(n_requests))
    lock = threading.Lock()
    results: list[Result] = []

    def worker() -> None:
        client = Client(url, timeout_s=timeout_s, headers=headers)
        try:
            while stop is None or not stop.is_set():
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                r = send(client, path, make_body(i), i)
                with lock:
                    results.append(r)
        finally:
            client.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return results, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def summarize(results: list[Result], wall_s: float) -> dict:
    ok = [r for r in results if r.status == 200]
    lat = [r.latency_s for r in ok]
    tokens = sum(r.completion_tokens for r in ok)
    out = {"requests": len(results), "ok": len(ok),
           "http_5xx": sum(1 for r in results if r.status >= 500),
           "no_answer": sum(1 for r in results if r.status == 0),
           "completion_tokens": tokens, "tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
           "requests_per_s": round(len(ok) / wall_s, 1) if wall_s > 0 else 0.0,
           "p50_s": round(percentile(lat, 50), 4), "p99_s": round(percentile(lat, 99), 4),
           "wall_s": round(wall_s, 3)}
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    if ttft:
        out.update(ttft_p50_s=round(percentile(ttft, 50), 4), ttft_p99_s=round(percentile(ttft, 99), 4))
    return out
