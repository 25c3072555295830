"""Real servers on 127.0.0.1 for tests: a free port, an ASGI app under uvicorn, the app in-process,
a Serve config deployed the way `serve run` deploys it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_server(app) -> Iterator[str]:
    """An ASGI app under a real uvicorn on 127.0.0.1 (a free port), in a thread; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def local_client(engine):
    """The FastAPI app around an in-process Engine (LocalBackend, no Ray), as a TestClient."""
    from fastapi.testclient import TestClient

    from app.api import build_app
    from serving.local import LocalBackend

    return TestClient(build_app(LocalBackend(engine)), raise_server_exceptions=False)


@contextlib.contextmanager
def serve_deployed(cfg: dict, num_cpus: int, timeout_s: float = 400) -> Iterator[str]:
    """A Serve config file's contents (a dict) deployed on a private Ray cluster started in
    this process, as `serve run CONFIG` does it: Serve started with the config's HTTP options,
    then the whole config handed to the controller. Yields the proxy's URL once every
    application is RUNNING; shuts Serve and Ray down after."""
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(cfg)
    # address="local": a private cluster even if another one is running on this machine.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
    try:
        client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
        client.deploy_apps(schema)
        wait_running(tuple(app.name for app in schema.applications), timeout_s)
        yield f"http://127.0.0.1:{schema.http_options.port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_running(names: tuple[str, ...], timeout_s: float) -> None:
    """Until every named Serve application of the connected cluster is RUNNING (a failed
    deploy raises at once)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: apps[n].status for n in names if n in apps}
        failed = {n: apps[n].message for n in states if states[n] == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"deploy failed: {failed}")
        if len(states) == len(names) and set(states.values()) == {"RUNNING"}:
            return
        time.sleep(0.5)
    raise TimeoutError(f"apps not running after {timeout_s}s: {serve.status().applications}")
