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
from contextlib import aclosing
from typing import AsyncIterator, Optional, Protocol

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from app.auth import bearer_dependency
from app.errors import APIError, BodyLimitMiddleware, error_body, failure_body, install_error_handlers
from app.playground import install_playground
from app.schemas import (CompleteRequest, CompleteResponse, CompletionChoice, CompletionRequest,
                         CompletionResponse, CompletionUsage, ErrorResponse, Health, ModelCard, ModelList, Usage)
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
    """The backend's stream, with a request that failed in decoding raised as GenerationError.
    Closed as soon as the consumer stops (aclosing), so the backend learns it at once."""
    async with aclosing(backend.stream(prompt, params, incremental=incremental)) as stream:
        async for d in stream:
            if d.error is not None:
                raise GenerationError(d.error)
            yield d


async def collect(backend: Backend, prompt: str, params: SamplingParams) -> tuple[str, Delta]:
    """Run one request to the end: (completion text, final delta)."""
    parts: list[str] = []
    async with aclosing(deltas(backend, prompt, params, incremental=False)) as stream:
        async for d in stream:
            parts.append(d.text)
            if d.finished:
                return "".join(parts), d
    raise RuntimeError("generation ended without a final step")


def check_new_tokens(n: int, context: int, field: str) -> None:
    if n > context - 1:
        raise APIError(422, f"{field}: must be at most {context - 1} (the model's context is "
                            f"{context} tokens and the prompt keeps at least one)", field)


ERROR_MEANINGS = {
    400: "The body is missing or is not valid JSON.",
    401: "Missing or wrong `Authorization: Bearer <key>` (only when the server has COMPLETE_API_KEY).",
    404: "No such model: `model` must be the one GET /v1/models lists.",
    413: "The body is larger than the server accepts.",
    415: "The body was not sent as `Content-Type: application/json`.",
    422: "A field is missing, unknown, of the wrong type or out of range; `error.field` names it.",
    500: "Generation failed for this request (alone); `error.request_id` is in the server's log.",
    503: "The model is not loaded yet.",
}
# One server-sent event (OpenAPI 3.1 has no per-event `itemSchema`; tools read `schema` as
# that): `data` is a JSON object, or "[DONE]" last.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}
SSE_200 = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                 "description": "The completion; with `stream: true`, server-sent events instead of JSON."}}


def errors(*codes: int) -> dict:
    """OpenAPI `responses` for these error statuses, all with the one error body."""
    return {c: {"model": ErrorResponse, "description": ERROR_MEANINGS[c]} for c in codes}


def build_app(backend: Backend, api_key: Optional[str] = None) -> FastAPI:
    app = FastAPI(title="codecomplete", description="Code completion with a GPT-2 trained from scratch.",
                  version="0.1.0")
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware)
    auth = [Depends(bearer_dependency(api_key))]
    denied = (401,) if api_key else ()
    body_errors = (400, *denied, 413, 415, 422, 500)
    install_playground(app)  # GET /: a page to try the model (it calls the routes below)

    @app.get("/health", response_model=Health, responses=errors(503))
    async def health():
        if not backend.ready():
            return JSONResponse(error_body(503, "model not loaded"), status_code=503)
        return Health(status="ok", model=backend.model_name)

    @app.post("/complete", dependencies=auth, response_model=CompleteResponse,
              responses={**SSE_200, **errors(*body_errors)})
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

    @app.get("/v1/models", dependencies=auth, response_model=ModelList, responses=errors(*denied))
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=backend.model_name, created=CREATED,
                                         max_model_len=backend.context_length,
                                         infill=bool(getattr(backend, "can_infill", False)))])

    @app.post("/v1/completions", dependencies=auth, response_model=CompletionResponse,
              responses={**SSE_200, **errors(*body_errors, 404)})
    async def completions(req: CompletionRequest):
        if req.model != backend.model_name:
            raise APIError(404, f"model '{req.model}' does not exist; this server serves "
                                f"'{backend.model_name}' (see GET /v1/models)", "model")
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

    app.openapi = lambda: model_limits_in_schema(app, backend)
    return app


def model_limits_in_schema(app: FastAPI, backend: Backend) -> dict:
    """The schema with the limits that come from the loaded model, so it says what the
    routes enforce: max_new_tokens / max_tokens <= context - 1, and the one model name.

    Request bodies are taken from pydantic directly: FastAPI's OpenAPI model stores bounds
    as floats, which would turn the seed's 2**64 - 1 into 1.8446744073709552e19."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        comps = schema["components"]["schemas"]
        for model, field, extra in ((CompleteRequest, "max_new_tokens", {}),
                                    (CompletionRequest, "max_tokens", {"model": {"enum": [backend.model_name]}})):
            own = model.model_json_schema(ref_template="#/components/schemas/{model}")
            own.pop("$defs", None)
            own["properties"][field]["maximum"] = backend.context_length - 1
            for name, more in extra.items():
                own["properties"][name].update(more)
            comps[model.__name__] = own
    return app.openapi_schema


CREATED = int(time.time())


def openai_reason(d: Delta) -> str:
    return "length" if d.finish_reason == "length" else "stop"  # OpenAI folds eos into "stop"


async def _complete_events(backend: Backend, prompt: str, params: SamplingParams) -> AsyncIterator[bytes]:
    """SSE for /complete: {"text": delta}... then a final event with the verdict, then [DONE]."""
    parts: list[str] = []
    try:
        async with aclosing(deltas(backend, prompt, params)) as stream:
            async for d in stream:
                parts.append(d.text)
                if d.finished:
                    yield sse({"text": d.text, "finish_reason": d.finish_reason, "completion": "".join(parts),
                               "usage": {"prompt_tokens": d.prompt_tokens,
                                         "completion_tokens": d.completion_tokens},
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
            async with aclosing(deltas(backend, prompt, params)) as stream:
                async for d in stream:
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
