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
from typing import AsyncIterator, Optional, Protocol

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from app.auth import bearer_dependency
from app.errors import APIError, BodyLimitMiddleware, error_body, failure_body, install_error_handlers
from app.schemas import (CompleteRequest, CompleteResponse, CompletionChoice, CompletionRequest,
                         CompletionResponse, CompletionUsage, ModelCard, ModelList, Usage)
from serving.params import Delta, GenerationError, SamplingParams

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Backend(Protocol):
    model_name: str
    context_length: int

    def ready(self) -> bool: ...

    def stream(self, prompt: str, params: SamplingParams, incremental: bool = True) -> AsyncIterator[Delta]:
        """The request's text as it is generated (incremental) or all in the final Delta."""
        ...


def sse(data: object) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def deltas(backend: Backend, prompt: str, params: SamplingParams,
                 incremental: bool = True) -> AsyncIterator[Delta]:
    """The backend's stream, with a request that failed in decoding raised as GenerationError."""
    async for d in backend.stream(prompt, params, incremental=incremental):
        if d.error is not None:
            raise GenerationError(d.error)
        yield d


async def collect(backend: Backend, prompt: str, params: SamplingParams) -> tuple[str, Delta]:
    """Run one request to the end: (completion text, final delta)."""
    parts: list[str] = []
    async for d in deltas(backend, prompt, params, incremental=False):
        parts.append(d.text)
        if d.finished:
            return "".join(parts), d
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
        if req.stream:
            return StreamingResponse(_complete_events(backend, req.prompt, params),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        text, final = await collect(backend, req.prompt, params)
        return CompleteResponse(completion=text, finish_reason=final.finish_reason, truncated=final.truncated,
                                usage=Usage(prompt_tokens=final.prompt_tokens,
                                            completion_tokens=final.completion_tokens),
                                model=backend.model_name)

    @app.get("/v1/models", dependencies=auth, response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=backend.model_name, created=CREATED,
                                         max_model_len=backend.context_length)])

    @app.post("/v1/completions", dependencies=auth, response_model=CompletionResponse)
    async def completions(req: CompletionRequest):
        if req.model != backend.model_name:
            raise APIError(404, f"model '{req.model}' does not exist; this server serves "
                                f"'{backend.model_name}' (see GET /v1/models)", "model")
        bad = req.unsupported()
        if bad:
            raise APIError(400, f"{bad}: not supported by this server (send null or leave it out)", bad)
        check_new_tokens(req.max_tokens, backend.context_length, "max_tokens")
        jobs = []  # (choice index, prompt, params): prompt-major, like OpenAI's `n` expansion
        for i, prompt in enumerate(req.prompts()):
            for j in range(req.n):
                seed = None if req.seed is None else req.seed + j  # n samples must differ
                jobs.append((i * req.n + j, prompt, SamplingParams(
                    max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                    top_k=req.top_k, stop=tuple(req.stops()), seed=seed)))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_openai_events(backend, jobs, req.n, rid, created, usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        results = await asyncio.gather(*(collect(backend, p, sp) for _, p, sp in jobs))
        choices = [CompletionChoice(index=idx, text=text, finish_reason=openai_reason(final))
                   for (idx, _, _), (text, final) in zip(jobs, results)]
        prompt_tokens = sum(final.prompt_tokens for k, (_, final) in enumerate(results) if k % req.n == 0)
        completion_tokens = sum(final.completion_tokens for _, final in results)
        return CompletionResponse(id=rid, created=created, model=backend.model_name, choices=choices,
                                  usage=CompletionUsage(prompt_tokens=prompt_tokens,
                                                        completion_tokens=completion_tokens,
                                                        total_tokens=prompt_tokens + completion_tokens))

    return app


CREATED = int(time.time())


def openai_reason(d: Delta) -> str:
    return "length" if d.finish_reason == "length" else "stop"  # OpenAI folds eos into "stop"


async def _complete_events(backend: Backend, prompt: str, params: SamplingParams) -> AsyncIterator[bytes]:
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


async def _openai_events(backend: Backend, jobs: list, n_per_prompt: int, rid: str, created: int,
                         include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI-style chunks for all choices, interleaved as their tokens arrive."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(idx: int, prompt: str, params: SamplingParams) -> None:
        try:
            async for d in deltas(backend, prompt, params):
                await queue.put((idx, d))
                if d.finished:
                    return
        except Exception as e:
            await queue.put((idx, e))

    tasks = [asyncio.create_task(pump(*job)) for job in jobs]
    pending, prompt_tokens, completion_tokens = len(jobs), {}, 0

    def chunk(choices: list, usage: Optional[dict] = None) -> bytes:
        body = {"id": rid, "object": "text_completion", "created": created, "model": backend.model_name,
                "choices": choices}
        if include_usage:
            body["usage"] = usage
        return sse(body)

    try:
        while pending:
            idx, d = await queue.get()
            if isinstance(d, Exception):
                yield sse(failure_body(d))
                return
            if d.text or d.finished:
                reason = openai_reason(d) if d.finished else None
                yield chunk([{"index": idx, "text": d.text, "finish_reason": reason, "logprobs": None}])
            if d.finished:
                pending -= 1
                prompt_tokens[idx // n_per_prompt] = d.prompt_tokens
                completion_tokens += d.completion_tokens
        if include_usage:
            p = sum(prompt_tokens.values())
            yield chunk([], {"prompt_tokens": p, "completion_tokens": completion_tokens,
                             "total_tokens": p + completion_tokens})
        yield sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
