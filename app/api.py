"""The FastAPI application: /complete, OpenAI-compatible /v1/*, /health.

It knows nothing about Ray: it talks to a `Backend` (the Serve deployment in production,
anything with the same four members in a unit test) that turns one request into an async
stream of `Delta`s. Batching happens behind that interface.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Optional, Protocol, Union

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from app.auth import bearer_dependency
from app.errors import APIError, BodyLimitMiddleware, error_body, failure_body, install_error_handlers
from app.schemas import CompleteRequest, CompleteResponse, ModelCard, ModelList, Usage
from serving.fim import Infill
from serving.params import Delta, GenerationError, SamplingParams

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
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def deltas(backend: Backend, prompt: Prompt, params: SamplingParams,
                 incremental: bool = True) -> AsyncIterator[Delta]:
    """The backend's stream, with a request that failed in decoding raised as GenerationError."""
    async for d in backend.stream(prompt, params, incremental=incremental):
        if d.error is not None:
            raise GenerationError(d.error)
        yield d


async def collect(backend: Backend, prompt: Prompt, params: SamplingParams,
                  with_logprobs: bool = False) -> Any:
    """Run one request to the end: (completion text, final delta[, logprob entries])."""
    parts: list[str] = []
    lps: list = []
    async for d in deltas(backend, prompt, params, incremental=False):
        parts.append(d.text)
        lps += d.logprobs
        if d.finished:
            return ("".join(parts), d, lps) if with_logprobs else ("".join(parts), d)
    raise RuntimeError("generation ended without a final step")


def check_new_tokens(n: int, context: int, field: str) -> None:
    if n > context - 1:
        raise APIError(422, f"{field}: must be at most {context - 1} (the model's context is "
                            f"{context} tokens and the prompt keeps at least one)", field)


def build_app(backend: Backend, api_key: Optional[str] = None) -> FastAPI:
    app = FastAPI(title="codecomplete", description="Code completion with a GPT-2 trained from scratch.",
                  version="0.1.0")
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware)
    auth = [Depends(bearer_dependency(api_key))]

    @app.get("/health")
    async def health() -> JSONResponse:
        if not backend.ready():
            return JSONResponse(error_body(503, "model not loaded"), status_code=503)
        return JSONResponse({"status": "ok", "model": backend.model_name})

    @app.post("/complete", dependencies=auth, response_model=CompleteResponse)
    async def complete(req: CompleteRequest):
        check_new_tokens(req.max_new_tokens, backend.context_length, "max_new_tokens")
        params = SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                                top_p=req.top_p, top_k=req.top_k, stop=tuple(req.stop), seed=req.seed)
        prompt: Prompt = req.prompt
        if req.suffix is not None:
            if req.suffix and not backend.can_infill:
                raise APIError(400, f"suffix: model '{backend.model_name}' was trained without fill-in-the-middle "
                                    "(no fim.json with fim_rate > 0), so it cannot complete with a suffix", "suffix")
            if backend.can_infill:
                prompt = Infill(req.prompt, req.suffix)
        if req.stream:
            return StreamingResponse(_complete_events(backend, prompt, params),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        text, final = await collect(backend, prompt, params)
        return CompleteResponse(completion=text, finish_reason=final.finish_reason, truncated=final.truncated,
                                usage=Usage(prompt_tokens=final.prompt_tokens,
                                            completion_tokens=final.completion_tokens),
                                model=backend.model_name)

    @app.get("/v1/models", dependencies=auth, response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=backend.model_name, created=CREATED,
                                         max_model_len=backend.context_length)])

    from app import openai_completions

    openai_completions.register(app, backend, auth)  # /v1/completions, /tokenize, /detokenize
    return app


CREATED = int(time.time())


async def _complete_events(backend: Backend, prompt: Prompt, params: SamplingParams) -> AsyncIterator[bytes]:
    """SSE for /complete: {"text": delta}... then a final event with the verdict, then [DONE]."""
    parts: list[str] = []
    try:
        async for d in deltas(backend, prompt, params):
            parts.append(d.text)
            if d.finished:
                yield sse({"text": d.text, "finish_reason": d.finish_reason, "completion": "".join(parts),
                           "usage": {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens},
                           "truncated": d.truncated, "model": backend.model_name})
                break
            if d.text:
                yield sse({"text": d.text})
    except Exception as e:  # headers are sent: report in-band, as TGI does
        yield sse(failure_body(e))
    yield sse("[DONE]")
