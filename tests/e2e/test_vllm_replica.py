"""The vLLM engine inside the project's own Ray Serve deployment, deployed from
serving/config.yaml as shipped with `engine: vllm`: the replica runs vLLM's AsyncLLM (its
engine process spawned from the Ray actor), and the service answers as it does on the native
engine (the conformance suite covers the API; this covers the replica)."""

from __future__ import annotations

import pytest
import ray
import requests
import yaml
from ray import serve

from tests.e2e.test_serving import wait_running
from tests.support import REPO_ROOT
from tests.support.engines import vllm_ready
from tests.support.servers import free_port
from tests.support.streams import sse_events

pytestmark = pytest.mark.slow

PROMPT = "def foo(x):\n    return x"


@pytest.fixture(scope="module")
def service(tiny_fim_checkpoint):
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    vllm_ready()
    port = free_port()
    cfg = yaml.safe_load((REPO_ROOT / "serving" / "config.yaml").read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    # fp32, as the native engine computes; without torch.compile (minutes on 2 cores, same tokens).
    app["args"].update(checkpoint=str(tiny_fim_checkpoint), engine="vllm", dtype="float32", vllm_eager=True,
                       max_batch_size=16)
    app["deployments"][0]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    schema = ServeDeploySchema.model_validate(cfg)
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
    try:
        client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
        client.deploy_apps(schema)
        wait_running(("complete",), timeout_s=400)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_replica_serves_on_vllm_what_the_native_engine_completes(service, fim_engine):
    want = fim_engine.complete(PROMPT, max_new_tokens=16)
    r = requests.post(service + "/complete", json={"prompt": PROMPT, "max_new_tokens": 16}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["completion"] == want.text
    r = requests.post(service + "/v1/completions", timeout=120, json={
        "model": fim_engine.model_name, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True,
        "repetition_penalty": 1.0, "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert "".join(c["text"] for e in events[:-2] for c in e["choices"]) == want.text
    stats = serve.get_app_handle("complete").stats.remote().result()
    assert stats["requests"] >= 2 and stats["live_rows"] == 0
