"""What the routes share: the Backend they talk to, and how a request runs through it.

The app knows nothing about Ray: it talks to a `Backend` (the Serve deployment in
production, serving/local.py's LocalBackend in unit tests, anything with the same members)
that turns one request into an async stream of `Delta`s. Batching happens behind that
interface. /complete (app/api.py) and /v1/completions (app/openai_completions.py) both
run requests with `deltas` / `collect`, answer streams as server-sent events (`sse`), and
check a request's token budget and suffix the same way.
"""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional, Protocol, Union

from app.errors import APIError
from serving.engine.params import Delta, GenerationError, Infill, SamplingParams

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Prompt = Union[str, list[int], Infill]  # text, token ids, or text with a suffix (FIM)


class Backend(Protocol):
    model_name: str
    context_length: int
    vocab_size: int
    can_infill: bool  # the model was trained with FIM (fim.json): `suffix` is served

    def ready(self) -> bool: ...

    def stream(self, prompt: Prompt, params: SamplingParams, incremental: bool = True) -> AsyncIterator[Delta]:
        """The request's text as it is generated (incremental) or all in the final Delta."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...


def sse(data: object) -> bytes:
    """One server-sent event: `data: <JSON or the string>`."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def deltas(backend: Backend, prompt: Prompt, params: SamplingParams,
                 incremental: bool = True) -> AsyncIterator[Delta]:
    """The backend's stream, with a request that failed in decoding raised as GenerationError.
    Closed as soon as the consumer stops (aclosing), so the backend learns it at once."""
    async with aclosing(backend.stream(prompt, params, incremental=incremental)) as stream:
        async for d in stream:
            if d.error is not None:
                raise GenerationError(d.error)
            yield d


async def collect(backend: Backend, prompt: Prompt, params: SamplingParams,
                  with_logprobs: bool = False) -> Any:
    """Run one request to the end: (completion text, final delta[, logprob entries])."""
    parts: list[str] = []
    lps: list = []
    async with aclosing(deltas(backend, prompt, params, incremental=False)) as stream:
        async for d in stream:
            parts.append(d.text)
            lps += d.logprobs
            if d.finished:
                return ("".join(parts), d, lps) if with_logprobs else ("".join(parts), d)
    raise RuntimeError("generation ended without a final step")


def check_new_tokens(n: int, context: int, field: str) -> None:
    """422 naming `field` when n tokens cannot follow even a one-token prompt."""
    if n > context - 1:
        raise APIError(422, f"{field}: must be at most {context - 1} (the model's context is "
                            f"{context} tokens and the prompt keeps at least one)", field)


def check_suffix(backend: Backend, suffix: Optional[str]) -> None:
    """400 naming `suffix` for a non-empty suffix that the model cannot serve (it was trained
    without fill-in-the-middle); an empty one is an ordinary completion."""
    if suffix and not backend.can_infill:
        raise APIError(400, f"suffix: model '{backend.model_name}' was trained without fill-in-the-middle "
                            "(its folder has no fim.json with fim_rate > 0), so it cannot complete with a "
                            "suffix; leave suffix out or serve a model trained with --fim-rate > 0", "suffix")
