"""Direct ingress (serving/deployment/ingress.py): each replica serves HTTP itself, no proxy in between.

As docs/serving.md tells cluster users: `RAY_SERVE_THROUGHPUT_OPTIMIZED=1 ray start --head`
(a real head on loopback), then `serving/run.py --ingress direct` joining it. The replica's
own port is asked what the proxy is asked, by real HTTP clients (requests, the openai
package, 16 at once). And the launcher refuses a head started without the mode, before it
deploys anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import openai
import requests

from tests.support.streams import sse_events
from serving.deployment.ingress import DIRECT_INGRESS_ENV, NO_BALANCER_ENV
from serving.loadtest import run_load
from tests.support.fuzzer import fuzz
from tests.support.live_service import live_service
from tests.support.ray_cluster import REPO_ROOT, LocalRayHead, free_port

KEY = "ingress-key-77"


def test_the_replica_port_serves_the_api_the_proxy_serves(tiny_checkpoint, tmp_path):
    with live_service(tiny_checkpoint, api_key=KEY, run_args=("--ingress", "direct"),
                      head_env={**DIRECT_INGRESS_ENV, **NO_BALANCER_ENV}) as svc:
        assert len(svc.replica_urls) == 1, svc.log.read_text()[-2000:]
        direct = svc.replica_urls[0]
        assert direct.startswith("http://127.0.0.1:") and direct != svc.url  # the bind host, its own port
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"prompt": "def add(a, b):\n", "max_new_tokens": 12}

        via_replica = requests.post(direct + "/complete", json=body, headers=auth, timeout=60)
        via_proxy = requests.post(svc.url + "/complete", json=body, headers=auth, timeout=60)
        assert via_replica.status_code == via_proxy.status_code == 200
        assert via_replica.json() == via_proxy.json()  # greedy: the same completion either way

        # The app's own rules hold on the replica's port: auth, validation, streaming.
        assert requests.post(direct + "/complete", json=body, timeout=30).status_code == 401
        r = requests.post(direct + "/complete", json={**body, "max_new_tokens": 0}, headers=auth, timeout=30)
        assert r.status_code == 422 and r.json()["error"]["field"] == "max_new_tokens"
        assert requests.get(direct + "/health", timeout=10).json()["status"] == "ok"
        r = requests.post(direct + "/complete", json={**body, "stream": True}, headers=auth, timeout=60)
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and "".join(e["text"] for e in events[:-1]) == via_proxy.json()["completion"]

        client = openai.OpenAI(base_url=direct + "/v1", api_key=KEY, max_retries=0)
        model = client.models.list().data[0].id
        done = client.completions.create(model=model, prompt=body["prompt"], max_tokens=12, temperature=0)
        assert done.choices[0].text == via_proxy.json()["completion"]

        results, _ = run_load(direct, lambda i: {"prompt": f"x{i} = ", "max_new_tokens": 16, "temperature": 0.2,
                                                 "top_p": 0.95, "seed": i},
                              n_requests=32, concurrency=16, headers=auth, stream=True)
        assert [r.status for r in results] == [200] * 32

        # Serve's direct-ingress wrapper sits where the proxy did: the fuzzer holds it to the schema too.
        cases, _ = fuzz(direct + "/openapi.json", seed=20261126, examples=40, workdir=tmp_path,
                        headers=(f"Authorization: Bearer {KEY}",))
        assert cases >= 100


def test_direct_ingress_on_a_head_started_without_it_fails_before_deploying(tiny_checkpoint):
    head = LocalRayHead(num_cpus=2).start()
    try:
        env = {**head.env, "RAY_ADDRESS": head.address}
        r = subprocess.run([sys.executable, "serving/run.py", "--checkpoint", str(tiny_checkpoint),
                            "--port", str(free_port()), "--ingress", "direct"], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in r.stderr and "ray start" in r.stderr
        assert "serving " not in r.stdout  # nothing was deployed
    finally:
        head.stop()


def test_run_py_starts_its_own_cluster_in_the_mode(tiny_checkpoint, tmp_path):
    """No RAY_ADDRESS: the launcher starts a local cluster with the mode on, prints the
    replica's URL, serves on it, and stops cleanly on SIGTERM."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "COMPLETE_API_KEY", *DIRECT_INGRESS_ENV, *NO_BALANCER_ENV)}
    env["PYTHONPATH"] = str(REPO_ROOT)
    log = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "serving/run.py", "--checkpoint", str(tiny_checkpoint),
                             "--port", str(free_port()), "--ingress", "direct"], cwd=REPO_ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "replicas:" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no replica URL printed:\n" + log.read_text()[-3000:]
            time.sleep(1)
        url = next(line.split()[1] for line in log.read_text().splitlines() if line.startswith("replicas:"))
        r = requests.post(url + "/complete", json={"prompt": "import os\n", "max_new_tokens": 8}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)  # the launcher alone: it shuts its Ray down itself
        try:
            code = proc.wait(timeout=90)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its Ray outlived it
            except ProcessLookupError:
                pass
    assert code == 0, log.read_text()[-3000:]
