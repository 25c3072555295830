"""The Ray Serve deployment: one Engine per replica behind the FastAPI app.

Each request submits itself to the replica's DecodeLoop (scheduler.py) and joins the rows
already decoding at the next step: continuous batching, one forward pass per step for
every request in flight, up to `max_batch_size` rows; requests that arrive during a step
prefill together at the next. The loop hands each request its Deltas through an asyncio
queue (serving/engine/streams.py), so it streams its tokens as they are produced while
sharing the batch.

Why not `@serve.batch`: the loop already batches at every step, and the batcher's
per-step plumbing (a result list for every caller, futures, a drain task per request) cost
the event loop more than the decode step itself on a small model (docs/serving.md).

The decode loop runs on its own thread: torch releases the GIL in its kernels, so the
replica's event loop keeps accepting requests and flushing streamed tokens meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from ray import serve

from app.api import build_app
from app.auth import api_key_from_env
from serving.deployment.allocator import keep_freed_memory
from serving.deployment.engine_choice import (choose_engine, cluster_gpus, cpu_has_native_bf16, model_params,
                                              replica_gpus, vllm_installed)
from serving.engine.engine import check_checkpoint
from serving.engine.engines import open_engine
from serving.engine.params import Delta, SamplingParams
from serving.serve_config import DEFAULTS, rows_in_flight, serve_queue_limits
from serving.deployment.service_metrics import RequestMetricsMiddleware, ServiceMetrics

# The defaults (rows decoding together, the wait of a request that finds the loop idle,
# the stream interval, CPUs per replica) are ServeConfig's (serving/serve_config.py).
# The stream interval is vLLM's stream_interval, in time: invisible in an editor, and far
# fewer chunks for the replica, the proxy and the client to handle.
_NOTHING = Delta("")  # a step that released no text for a request


@serve.deployment(
    name="Completer",
    ray_actor_options={"num_cpus": DEFAULTS.num_cpus},
    # Above a full batch plus the replica's queue (serving/serve_config.py: serve_queue_limits),
    # so requests past it reach the replica's gate and get its fast 503 (app/admission.py).
    **serve_queue_limits(DEFAULTS.max_batch_size, DEFAULTS.max_queued),
    health_check_period_s=2.0,
    health_check_timeout_s=30.0,
    graceful_shutdown_timeout_s=5.0,
)
@serve.ingress()
class Completer:
    def __init__(self, checkpoint: str, model_name: Optional[str] = None, num_threads: Optional[int] = None,
                 max_batch_size: int = DEFAULTS.max_batch_size, batch_wait_timeout_s: float = DEFAULTS.batch_wait_s,
                 stream_interval_s: float = DEFAULTS.stream_interval_s, engine: str = "native",
                 dtype: str = DEFAULTS.dtype, vllm_eager: bool = False, max_queued: int = DEFAULTS.max_queued,
                 retry_after_s: int = DEFAULTS.retry_after_s):
        threads = num_threads or _replica_cpus()
        self._malloc_tuned = keep_freed_memory()  # the decode loop reuses its tensors' memory (serving/deployment/allocator.py)
        # native or vllm (chosen where the app was built: serving/deployment/engine_choice.py),
        # on the GPU this replica was given, if any; plugins (CODECOMPLETE_ENGINE_PLUGINS) go into the native one.
        self.serving = open_engine(engine, checkpoint, model_name=model_name, num_threads=threads,
                                   max_batch_size=max_batch_size, dtype=dtype, enforce_eager=vllm_eager,
                                   device="cuda" if _replica_gpus() > 0 else "cpu")
        self.engine = getattr(self.serving, "engine", self.serving)
        self.model_name = self.serving.model_name
        self.context_length = self.serving.context_length
        self.vocab_size = self.serving.vocab_size
        self.can_infill = self.serving.can_infill  # fim.json: the app serves `suffix`
        self.tokenize, self.detokenize = self.serving.tokenize, self.serving.detokenize
        # The app's admission gate (app/admission.py) reads these: rows held at most, the 503's Retry-After.
        self.max_rows_in_flight = rows_in_flight(max_batch_size, max_queued)
        self.retry_after_s = retry_after_s
        self.metrics = ServiceMetrics(self.model_name)  # Prometheus, via Ray's metrics agent
        self.serving.observer = self.metrics
        self._batch_wait_s = max(0.0, float(batch_wait_timeout_s))
        self._stream_interval_s = max(0.0, float(stream_interval_s))
        # Per-request times inside the replica (sums): entry to first text, entry to the end.
        self._times = {"requests": 0, "first_s": 0.0, "total_s": 0.0}

    def stats(self) -> dict[str, float]:
        """Decode-loop counters (for tests and operators): rows decoding now, steps, rows cancelled;
        malloc_tuned is 1 where serving/deployment/allocator.py's settings apply; the process's
        resident memory now and at its peak (MiB)."""
        return {**self.serving.stats(), "malloc_tuned": float(self._malloc_tuned), **_memory_mib(), **self._times}

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
        """The request's Deltas as the decode loop produces them (text, then a final verdict)."""
        t0 = time.perf_counter()
        first: Optional[float] = None
        sent = t0
        held: list[Delta] = []  # Deltas not handed out yet
        finished = False
        await self._admit()
        # Ending this stream early (client gone: Serve cancels the request, or the streaming
        # response is closed) cancels the request: the decode loop drops its row before its next step.
        try:
            async with aclosing(self.serving.steps(prompt, params, incremental)) as steps:
                async for deltas in steps:  # ValueError at the first: a bad request
                    held.extend(deltas)
                    delta = _merge(held)
                    now = time.perf_counter()
                    # The first text goes out at once; later text at most every stream_interval_s
                    # (each chunk costs the replica, the proxy and the client more than a step).
                    if delta.finished or (delta.text and (first is None or now - sent >= self._stream_interval_s)):
                        held, sent = [], now
                        finished = delta.finished  # before yielding: the consumer may stop at the last delta
                        first = first or now
                        yield delta
        finally:
            if finished:
                self._times["requests"] += 1
                self._times["first_s"] += (first or t0) - t0
                self._times["total_s"] += time.perf_counter() - t0

    async def _admit(self) -> None:
        """A request that finds the decode loop idle waits `batch_wait_timeout_s` for company,
        so a burst prefills together (0, the default, starts it at once). A busy loop needs no
        wait: whatever arrives during a step joins at the next one."""
        if self._batch_wait_s > 0 and self.serving.live_rows == 0:
            await asyncio.sleep(self._batch_wait_s)


def _merge(present: list[Delta]) -> Delta:
    """Several steps' deltas for one request as one (text joined, the final verdict kept)."""
    if not present:
        return _NOTHING
    last = present[-1]
    if len(present) == 1:
        return last
    return replace(last, text="".join(d.text for d in present), logprobs=[e for d in present for e in d.logprobs])


def _memory_mib() -> dict[str, float]:
    """This process's resident set now (from /proc, where there is one) and its peak (getrusage)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    try:
        now = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        now = peak
    return {"rss_mib": now, "peak_rss_mib": peak}
def _replica_gpus() -> float:
    """GPUs this replica reserved (0 outside Ray)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0))


def _replica_cpus() -> int:
    """Torch threads = the CPUs this replica reserved (at least 1)."""
    import ray

    if not ray.is_initialized():
        return 1
    res = ray.get_runtime_context().get_assigned_resources()
    return max(1, int(round(res.get("CPU", 1))))


def build(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run` / `serve deploy` (import path `serving.deployment:build`).

    args: checkpoint (required), model_name, num_threads, max_batch_size, batch_wait_timeout_s,
    stream_interval_s, max_queued, retry_after_s, engine (auto, native, vllm), dtype, num_gpus
    (per replica), vllm_eager (the vLLM engine without torch.compile: starts in seconds instead
    of minutes on a small CPU). Serve's own max_ongoing_requests / max_queued_requests go in the
    config's `deployments` section (serving/config.yaml).
    The checkpoint is checked here, so a bad path fails the deploy with a message naming it.
    A GPU the config's ray_actor_options does not ask for is added here for the vLLM engine
    on a cluster with GPUs (serving/deployment/engine_choice.py).
    """
    args = dict(args or {})
    if "checkpoint" not in args:
        raise ValueError("args.checkpoint is required: the training run's OUTPUT/model/ folder")
    known = {"checkpoint", "model_name", "num_threads", "max_batch_size", "batch_wait_timeout_s", "stream_interval_s",
             "max_queued", "retry_after_s", "engine", "dtype", "num_gpus", "vllm_eager"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown args {unknown}; known: {sorted(known)}")
    args["checkpoint"] = str(check_checkpoint(Path(args["checkpoint"]).expanduser().resolve()))
    gpus = cluster_gpus()
    args["engine"] = choose_engine(str(args.get("engine", DEFAULTS.engine)), gpus, vllm_installed(),
                                   model_params(args["checkpoint"]), cpu_has_native_bf16())
    num_gpus = replica_gpus(args["engine"], args.pop("num_gpus", DEFAULTS.num_gpus), gpus)
    if num_gpus:
        return Completer.options(ray_actor_options={"num_cpus": DEFAULTS.num_cpus, "num_gpus": num_gpus}).bind(**args)
    return Completer.bind(**args)


app_builder = build  # the name Serve's docs use


def deploy_options(num_cpus: float = DEFAULTS.num_cpus, num_replicas: int = DEFAULTS.num_replicas,
                   env_vars: Optional[dict[str, str]] = None, num_gpus: float = 0.0,
                   max_batch_size: int = DEFAULTS.max_batch_size, max_queued: int = DEFAULTS.max_queued) -> dict[str, Any]:
    """Deployment options for `Completer.options(...)`: CPUs (and GPUs) per replica, replica count, env,
    and Serve's queue limits around the replica's gate."""
    actor: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        actor["num_gpus"] = num_gpus
    if env_vars:
        actor["runtime_env"] = {"env_vars": env_vars}
    return {"ray_actor_options": actor, "num_replicas": num_replicas, **serve_queue_limits(max_batch_size, max_queued)}


def key_env() -> dict[str, str]:
    """COMPLETE_API_KEY of the launching shell, for replicas that may not inherit it."""
    key = os.environ.get("COMPLETE_API_KEY")
    return {"COMPLETE_API_KEY": key} if key else {}
