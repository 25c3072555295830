"""The service as a user starts it, for tests that look at it from outside (browser, Prometheus).

`ray start --head --metrics-export-port=P` (tests/ray_cluster.py: loopback, free ports, its
own auth token), then `python serving/run.py --checkpoint ...` joining that head, the way
docs/serving.md tells users to run it on a cluster. Everything is stopped on exit, by
process group, touching nothing else on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import requests

from tests.support.ray_cluster import REPO_ROOT, LocalRayHead, free_port


@dataclass
class LiveService:
    url: str  # the HTTP proxy: http://127.0.0.1:PORT
    metrics_url: str  # the head's Prometheus endpoint: http://127.0.0.1:PORT/metrics
    head: LocalRayHead
    log: Path
    replica_urls: list[str] = field(default_factory=list)  # --ingress direct: each replica's own HTTP server


@contextmanager
def live_service(checkpoint: Path, api_key: Optional[str] = None, timeout_s: float = 420,
                 run_args: tuple[str, ...] = (), head_env: Optional[dict[str, str]] = None) -> Iterator[LiveService]:
    """run_args: more flags for serving/run.py; head_env: the environment of `ray start`."""
    metrics_port, http_port = free_port(), free_port()
    head = LocalRayHead(num_cpus=4, extra_args=[f"--metrics-export-port={metrics_port}"], env=head_env).start()
    log = Path(head.temp_dir) / "serve_run.log"
    env = {**head.env, "RAY_ADDRESS": head.address}
    env.pop("COMPLETE_API_KEY", None)
    if api_key:
        env["COMPLETE_API_KEY"] = api_key
    proc = subprocess.Popen([sys.executable, "serving/run.py", "--checkpoint", str(checkpoint),
                             "--port", str(http_port), *run_args], cwd=REPO_ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serving/run.py exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                printed = "direct" not in run_args or "replicas:" in log.read_text()  # its URLs, once deployed
                if printed and requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"service not healthy after {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        replicas = [line.split()[1:] for line in log.read_text().splitlines() if line.startswith("replicas:")]
        yield LiveService(url, f"http://127.0.0.1:{metrics_port}/metrics", head, log, replicas[0] if replicas else [])
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # serving/run.py deletes its app and exits
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.stop()
