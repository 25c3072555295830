"""Prometheus metrics of the completion service, through Ray's own metrics API.

Each replica records with `ray.serve.metrics` (Ray's `ray.util.metrics` plus the deployment,
replica and application tags); Ray's metrics agent on every node gathers them and exposes
them, with all of Ray's and Serve's own metrics, on the node's metrics export port
(`ray start --metrics-export-port=8080`, then scrape `http://NODE:8080/metrics`). Ray prefixes
every name with `ray_`, and counters get `_total`: `codecomplete_requests` is scraped as
`ray_codecomplete_requests_total`. docs/serving.md has the scrape config and a query per panel.

What is recorded where:
- HTTP requests by route and status, and their latency (until the last byte of a stream):
  an ASGI middleware around the FastAPI app, so 4xx answered before any model work count too.
- Prompt and completion tokens, time to first token, rows in the decode batch, queue depth:
  the replica's DecodeLoop (serving/engine/scheduler.py) reports each step to its `observer`
  (ServiceMetrics.step).

Recording never fails a request: a metrics error is logged once and ignored.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

log = logging.getLogger(__name__)

PREFIX = "codecomplete_"
# Seconds. Latency spans a 2-token completion on a GPU to a 127-token one on a loaded CPU.
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TTFT_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
# Known routes keep the label's values bounded: any other path (a scanner's) is "other".
ROUTES = ("/", "/health", "/complete", "/v1/completions", "/v1/models", "/docs", "/openapi.json")


def route_of(scope: dict[str, Any]) -> str:
    """The route a request addressed, without the app's route prefix (e.g. /secure)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path if path in ROUTES else "other"


class ServiceMetrics:
    """The replica's metrics. Create it inside the replica (Serve adds its tags there)."""

    def __init__(self, model_name: str):
        from ray.serve.metrics import Counter, Gauge, Histogram

        tags = {"model": model_name}
        self.requests = Counter(PREFIX + "requests", "HTTP requests answered, by route and status code.",
                                tag_keys=("model", "route", "status"))
        self.latency = Histogram(PREFIX + "request_latency_seconds",
                                 "Seconds from request arrival to the response's last byte, by route.",
                                 boundaries=LATENCY_BUCKETS_S, tag_keys=("model", "route"))
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Seconds from a request's admission to the decode loop to its first sampled token.",
                              boundaries=TTFT_BUCKETS_S, tag_keys=("model",))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests (after "
                                     "truncation to the context).", tag_keys=("model",))
        self.completion_tokens = Counter(PREFIX + "completion_tokens", "Tokens generated for finished requests.",
                                         tag_keys=("model",))
        self.batch_rows = Gauge(PREFIX + "decode_batch_rows", "Rows (requests) in the last decode step.",
                                tag_keys=("model",))
        self.decode_steps = Counter(PREFIX + "decode_steps", "Decode steps run (one forward pass each).",
                                    tag_keys=("model",))
        self.decode_row_steps = Counter(PREFIX + "decode_row_steps", "Rows summed over decode steps: "
                                        "row_steps / steps is the mean batch.", tag_keys=("model",))
        self.queue_depth = Gauge(PREFIX + "queue_depth", "Requests in the replica waiting for a row in the "
                                 "decode batch.", tag_keys=("model",))
        for m in (self.requests, self.latency, self.ttft, self.prompt_tokens, self.completion_tokens,
                  self.batch_rows, self.decode_steps, self.decode_row_steps, self.queue_depth):
            m.set_default_tags({**tags})
        self._warned = False

    def _safe(self, fn, *args: Any, **kw: Any) -> None:
        try:
            fn(*args, **kw)
        except Exception:  # noqa: BLE001 - metrics must never break serving
            if not self._warned:
                self._warned = True
                log.exception("recording a metric failed; further failures are not logged")

    # ---- HTTP ------------------------------------------------------------------------------

    def request_done(self, route: str, status: int, seconds: float) -> None:
        self._safe(self.requests.inc, 1, tags={"route": route, "status": str(status)})
        self._safe(self.latency.observe, seconds, tags={"route": route})

    # ---- the decode loop (called on its thread) ----------------------------------------------

    def step(self, rows: int, waiting: int, first_token_s: list[float], finished: list[tuple[int, int]]) -> None:
        """One decode step: rows that decoded, requests still waiting, TTFTs of requests that got
        their first token in it, (prompt, completion) tokens of requests that finished in it."""
        self._safe(self.batch_rows.set, rows)
        self._safe(self.queue_depth.set, waiting)
        if rows:
            self._safe(self.decode_steps.inc, 1)
            self._safe(self.decode_row_steps.inc, rows)
        for s in first_token_s:
            self._safe(self.ttft.observe, s)
        prompt, completion = sum(p for p, _ in finished), sum(c for _, c in finished)
        if prompt:  # Ray counters refuse an increment of 0
            self._safe(self.prompt_tokens.inc, prompt)
        if completion:
            self._safe(self.completion_tokens.inc, completion)


class RequestMetricsMiddleware:
    """ASGI middleware: one `request_done` per HTTP request, after its last byte is sent."""

    def __init__(self, app: Any, metrics: Optional[ServiceMetrics]):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.metrics is None:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}  # what a request that raised before answering becomes

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.request_done(route_of(scope), status["code"], time.perf_counter() - t0)
