"""The Ray Serve deployment: one Engine per replica behind the FastAPI app, with @serve.batch.

Concurrent requests queue in `_batch`; Serve hands it up to `max_batch_size` of them at once
(waiting at most `batch_wait_timeout_s` after the first) and the engine decodes them together,
one forward pass per step for the whole batch. `_batch` is an async generator so each request
gets its tokens as they are produced (streaming) while still sharing the batch.

The decode steps run on one worker thread: torch releases the GIL in its kernels, so the
replica's event loop keeps accepting requests (which join the next batch) and flushing
streamed tokens while a batch computes.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from ray import serve

from app.api import build_app
from app.auth import api_key_from_env
from serving.engine import Delta, Engine, SamplingParams, check_checkpoint

DEFAULT_MAX_BATCH_SIZE = 32
# Paid once by a request that arrives alone; long enough for a burst of clients to join.
DEFAULT_BATCH_WAIT_S = 0.005
DEFAULT_REPLICA_CPUS = 1.0
_DONE = StopAsyncIteration  # @serve.batch's "this caller's stream is over" sentinel
_NOTHING = Delta("")  # a step that released no text for a request


@serve.deployment(
    name="Completer",
    ray_actor_options={"num_cpus": DEFAULT_REPLICA_CPUS},
    # Must cover a full batch, or the router never hands a replica enough requests to batch.
    max_ongoing_requests=2 * DEFAULT_MAX_BATCH_SIZE,
    health_check_period_s=2.0,
    health_check_timeout_s=30.0,
    graceful_shutdown_timeout_s=5.0,
)
@serve.ingress()
class Completer:
    def __init__(self, checkpoint: str, model_name: Optional[str] = None, num_threads: Optional[int] = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S):
        threads = num_threads or _replica_cpus()
        self.engine = Engine(checkpoint, num_threads=threads, model_name=model_name)
        self.engine.warmup()
        self.model_name = self.engine.model_name
        self.context_length = self.engine.context_length
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        # Built after __init__, i.e. once the model is loaded: /health is 200 from the first request.
        return build_app(self, api_key=api_key_from_env())

    def ready(self) -> bool:
        return getattr(self, "engine", None) is not None

    def check_health(self) -> None:
        if not self.ready():
            raise RuntimeError("model not loaded")

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[Delta]:
        steps = self._batch((prompt, params))
        try:
            async for d in steps:
                if d.text or d.finished:
                    yield d
                if d.finished:
                    break
        finally:
            # The batcher still resolves this request's next future (with StopAsyncIteration)
            # one step later; consume it off the request path so it is not logged as lost.
            asyncio.ensure_future(_drain(steps))

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _batch(self, jobs: list[tuple[str, SamplingParams]]) -> AsyncIterator[list[Any]]:
        steps = self.engine.stream_batch([p for p, _ in jobs], [sp for _, sp in jobs])
        loop = asyncio.get_running_loop()
        finished = [False] * len(jobs)
        try:
            while True:
                step = await loop.run_in_executor(self._executor, next, steps, None)
                if step is None:
                    return
                out: list[Any] = []
                for i, d in enumerate(step):
                    if finished[i]:
                        out.append(_DONE)
                    else:
                        out.append(d if d is not None else _NOTHING)
                        finished[i] = d is not None and d.finished
                yield out
        finally:
            try:
                steps.close()
            except ValueError:  # cancelled while a step still runs on the worker thread
                pass


async def _drain(steps: AsyncIterator[Any]) -> None:
    try:
        async for _ in steps:
            pass
    except Exception:
        pass


def _replica_cpus() -> int:
    """Torch threads = the CPUs this replica reserved (at least 1)."""
    import ray

    if not ray.is_initialized():
        return 1
    res = ray.get_runtime_context().get_assigned_resources()
    return max(1, int(round(res.get("CPU", 1))))


def build(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run` / `serve deploy` (import path `serving.deployment:build`).

    args: checkpoint (required), model_name, num_threads, max_batch_size, batch_wait_timeout_s.
    The checkpoint is checked here, so a bad path fails the deploy with a message naming it.
    """
    args = dict(args or {})
    if "checkpoint" not in args:
        raise ValueError("args.checkpoint is required: the training run's OUTPUT/model/ folder")
    known = {"checkpoint", "model_name", "num_threads", "max_batch_size", "batch_wait_timeout_s"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown args {unknown}; known: {sorted(known)}")
    args["checkpoint"] = str(check_checkpoint(Path(args["checkpoint"]).expanduser().resolve()))
    return Completer.bind(**args)


app_builder = build  # the name Serve's docs use


def deploy_options(num_cpus: float = DEFAULT_REPLICA_CPUS, num_replicas: int = 1,
                   env_vars: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Deployment options for `Completer.options(...)`: CPUs per replica, replica count, env."""
    actor: dict[str, Any] = {"num_cpus": num_cpus}
    if env_vars:
        actor["runtime_env"] = {"env_vars": env_vars}
    return {"ray_actor_options": actor, "num_replicas": num_replicas}


def key_env() -> dict[str, str]:
    """COMPLETE_API_KEY of the launching shell, for replicas that may not inherit it."""
    key = os.environ.get("COMPLETE_API_KEY")
    return {"COMPLETE_API_KEY": key} if key else {}
