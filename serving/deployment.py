"""The Ray Serve deployment: one Engine per replica behind the FastAPI app, with @serve.batch.

Concurrent requests queue in `_batch`; Serve hands it up to ADMIT_GROUP of them at once
(waiting at most `batch_wait_timeout_s` after the first), and `_batch` submits them to the
replica's DecodeLoop (scheduler.py), where they join the rows already decoding at the next
step: continuous batching, one forward pass per step for every request in flight, up to
`max_batch_size` rows. `_batch` is an async generator so each request gets its tokens as
they are produced (streaming) while still sharing the batch.

The decode loop runs on its own thread: torch releases the GIL in its kernels, so the
replica's event loop keeps accepting requests and flushing streamed tokens meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from ray import serve

from app.api import build_app
from app.auth import api_key_from_env
from serving.engine import Engine, check_checkpoint
from serving.params import Delta, SamplingParams
from serving.scheduler import DecodeLoop
from serving.service_metrics import RequestMetricsMiddleware, ServiceMetrics

DEFAULT_MAX_BATCH_SIZE = 64  # rows decoding together in the replica's DecodeLoop
# @serve.batch groups what arrives within the wait into one prefill, and up to
# CONCURRENT_GROUPS groups decode at once in the DecodeLoop (they join it at any step).
ADMIT_GROUP = 4
CONCURRENT_GROUPS = DEFAULT_MAX_BATCH_SIZE // ADMIT_GROUP
# Paid once by a request that arrives alone; long enough for a burst of clients to join.
DEFAULT_BATCH_WAIT_S = 0.005
DEFAULT_REPLICA_CPUS = 1.0
_DONE = StopAsyncIteration  # @serve.batch's "this caller's stream is over" sentinel
_NOTHING = Delta("")  # a step that released no text for a request


@serve.deployment(
    name="Completer",
    ray_actor_options={"num_cpus": DEFAULT_REPLICA_CPUS},
    # Must cover a full batch, or the router never hands a replica enough requests to batch.
    max_ongoing_requests=DEFAULT_MAX_BATCH_SIZE,
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
        self.vocab_size = self.engine.vocab_size
        self.can_infill = self.engine.fim is not None  # fim.json: the app serves `suffix`
        self.tokenize, self.detokenize = self.engine.tokenize, self.engine.detokenize
        self.decoder = DecodeLoop(self.engine, max_rows=max_batch_size)
        self.metrics = ServiceMetrics(self.model_name)  # Prometheus, via Ray's metrics agent
        self.decoder.observer = self.metrics
        self._batch.set_max_batch_size(min(ADMIT_GROUP, max_batch_size))
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._drains: set[asyncio.Task] = set()  # held until done: the loop keeps only weak references
        # Per-request times inside the replica (sums): entry to first text, entry to the end.
        self._times = {"requests": 0, "first_s": 0.0, "total_s": 0.0}

    def stats(self) -> dict[str, float]:
        """Decode-loop counters (for tests and operators): rows decoding now, steps, rows cancelled."""
        d = self.decoder
        return {"live_rows": d.live_rows, "steps": d.steps, "max_rows_seen": d.max_rows_seen,
                "cancelled": d.cancelled, "draining": len(self._drains), **d.timings, **self._times}

    def __serve_build_asgi_app__(self):
        # Built after __init__, i.e. once the model is loaded: /health is 200 from the first request.
        app = build_app(self, api_key=api_key_from_env())
        app.add_middleware(RequestMetricsMiddleware, metrics=self.metrics)  # outermost: counts every answer
        return app

    def ready(self) -> bool:
        return getattr(self, "engine", None) is not None

    def check_health(self) -> None:
        if not self.ready():
            raise RuntimeError("model not loaded")

    async def stream(self, prompt: Any, params: SamplingParams, incremental: bool = True) -> AsyncIterator[Delta]:
        # Set when this request ends early (client gone: Serve cancels the request, or the
        # streaming response is closed): the decode loop drops the row before its next step.
        cancel = threading.Event()
        t0 = time.perf_counter()
        first: Optional[float] = None
        steps = self._batch((prompt, params, incremental, cancel))
        finished = False
        try:
            async for d in steps:
                finished = d.finished  # before yielding: the consumer may stop at the last delta
                if d.text or d.finished:
                    first = first or time.perf_counter()
                    yield d
                if d.finished:
                    break
        finally:
            if not finished:
                cancel.set()
            else:
                self._times["requests"] += 1
                self._times["first_s"] += (first or t0) - t0
                self._times["total_s"] += time.perf_counter() - t0
            # The batcher still resolves this request's next future (with StopAsyncIteration)
            # one step later; consume it off the request path so it is not logged as lost.
            task = asyncio.ensure_future(_drain(steps))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)

    @serve.batch(max_batch_size=ADMIT_GROUP, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S,
                 max_concurrent_batches=CONCURRENT_GROUPS)
    async def _batch(self, jobs: list[tuple[str, SamplingParams, bool, threading.Event]]) -> AsyncIterator[list[Any]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item: Any) -> None:  # called on the decode thread, once per step with news
            loop.call_soon_threadsafe(queue.put_nowait, item)

        self.decoder.submit([j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs], emit,
                            cancel=[j[3] for j in jobs])
        finished = [False] * len(jobs)
        while not all(finished):
            steps = [await queue.get()]
            while not queue.empty():  # the loop fell behind: hand over several steps at once
                steps.append(queue.get_nowait())
            out: list[Any] = []
            for i in range(len(jobs)):
                if finished[i]:
                    out.append(_DONE)
                    continue
                merged = _merge([s[i] for s in steps if isinstance(s, list)])
                out.append(merged)
                finished[i] = merged.finished
            yield out
            for s in steps:
                if isinstance(s, BaseException):
                    raise s
                if s is None and not all(finished):
                    raise RuntimeError("generation ended before every request finished")


def _merge(deltas: list[Optional[Delta]]) -> Delta:
    """Several steps' deltas for one request as one (text joined, the final verdict kept)."""
    present = [d for d in deltas if d is not None]
    if not present:
        return _NOTHING
    last = present[-1]
    if len(present) == 1:
        return last
    return replace(last, text="".join(d.text for d in present), logprobs=[e for d in present for e in d.logprobs])


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
