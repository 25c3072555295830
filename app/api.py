"""The FastAPI application: /complete, OpenAI-compatible /v1/*, /health.

It knows nothing about Ray: it talks to a `Backend` (app/backend.py: the Serve deployment
in production, anything with the same members in a unit test) that turns one request into
an async stream of `Delta`s. Batching happens behind that interface.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from app import openai_completions
from app.auth import bearer_dependency
from app.admission import AdmissionGate, GatedStreamingResponse
from app.backend import SSE_HEADERS, Backend, Prompt, check_new_tokens, check_suffix, collect, deltas, sse
from app.errors import BODY_TIMEOUT_S, BodyLimitMiddleware, error_body, failure_body, install_error_handlers
from app.playground import install_playground
from app.schemas import (CompleteRequest, CompleteResponse, CompletionRequest, DetokenizeRequest, ErrorResponse,
                         Health, ModelCard, ModelList, Usage)
from serving.engine.params import Infill, SamplingParams


ERROR_MEANINGS = {
    400: "The body is missing or is not valid JSON.",
    401: "Missing or wrong `Authorization: Bearer <key>` (only when the server has COMPLETE_API_KEY).",
    404: "No such model: `model` must be the one GET /v1/models lists.",
    408: f"The body did not arrive within {BODY_TIMEOUT_S:g} s of the request.",
    413: "The body is larger than the server accepts.",
    415: "The body was not sent as `Content-Type: application/json`.",
    422: "A field is missing, unknown, of the wrong type or out of range; `error.field` names it.",
    500: "Generation failed for this request (alone); `error.request_id` is in the server's log.",
    503: "The model is not loaded yet (/health), or the server is overloaded (the completion routes): "
         "retry after the `Retry-After` header's seconds.",
}
# The completion routes' 503: load shedding (app/admission.py), with the header a client backs off by.
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
# One server-sent event (OpenAPI 3.1 has no per-event `itemSchema`; tools read `schema` as
# that): `data` is a JSON object, or "[DONE]" last.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}
SSE_200 = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                 "description": "The completion; with `stream: true`, server-sent events instead of JSON."}}


def errors(*codes: int) -> dict:
    """OpenAPI `responses` for these error statuses, all with the one error body."""
    out: dict = {c: {"model": ErrorResponse, "description": ERROR_MEANINGS[c]} for c in codes}
    if 503 in out:
        out[503]["headers"] = RETRY_AFTER
    return out


def build_app(backend: Backend, api_key: Optional[str] = None) -> FastAPI:
    app = FastAPI(title="codecomplete", description="Code completion with a GPT-2 trained from scratch.",
                  version="0.1.0")
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware)
    auth = [Depends(bearer_dependency(api_key))]
    denied = (401,) if api_key else ()
    body_errors = (400, *denied, 408, 413, 415, 422, 500, 503)
    gate = app.state.admission = AdmissionGate.for_backend(backend)  # load shedding (app/admission.py)
    install_playground(app)  # GET /: a page to try the model (it calls the routes below)

    @app.get("/health", response_model=Health,
             responses={503: {"model": ErrorResponse, "description": "The model is not loaded yet."}})
    async def health():
        if not backend.ready():
            return JSONResponse(error_body(503, "model not loaded"), status_code=503)
        return Health(status="ok", model=backend.model_name)

    @app.post("/complete", dependencies=auth, response_model=CompleteResponse,
              responses={**SSE_200, **errors(*body_errors)})
    async def complete(req: CompleteRequest):
        check_new_tokens(req.max_new_tokens, backend.context_length, "max_new_tokens")
        params = SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                                top_p=req.top_p, top_k=req.top_k, stop=tuple(req.stop), seed=req.seed,
                                ignore_eos=req.ignore_eos)
        prompt: Prompt = req.prompt
        if req.suffix is not None:
            check_suffix(backend, req.suffix)
            if backend.can_infill:
                prompt = Infill(req.prompt, req.suffix)
        ticket = gate.enter(1)
        if req.stream:
            return GatedStreamingResponse(_complete_events(backend, prompt, params), ticket,
                                          media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            text, final = await collect(backend, prompt, params)
        finally:
            ticket.release()
        return CompleteResponse(completion=text, finish_reason=final.finish_reason, truncated=final.truncated,
                                usage=Usage(prompt_tokens=final.prompt_tokens,
                                            completion_tokens=final.completion_tokens),
                                model=backend.model_name)

    @app.get("/v1/models", dependencies=auth, response_model=ModelList, responses=errors(*denied))
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=backend.model_name, created=CREATED,
                                         max_model_len=backend.context_length,
                                         infill=bool(getattr(backend, "can_infill", False)))])

    # /v1/completions, /tokenize, /detokenize
    openai_completions.register(app, backend, auth, gate, responses={**SSE_200, **errors(*body_errors, 404)})

    app.openapi = lambda: model_limits_in_schema(app, backend)
    return app


def model_limits_in_schema(app: FastAPI, backend: Backend) -> dict:
    """The schema with the limits that come from the loaded model, so it says what the
    routes enforce: max_new_tokens / max_tokens <= context - 1, and the one model name.

    Request bodies are taken from pydantic directly: FastAPI's OpenAPI model stores bounds
    as floats, which would turn a seed's bound 2**64 - 1 into 1.8446744073709552e19."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        comps = schema["components"]["schemas"]
        for model, field, extra in ((CompleteRequest, "max_new_tokens", {}),
                                    (CompletionRequest, "max_tokens", {"model": {"enum": [backend.model_name]}}),
                                    (DetokenizeRequest, None, {})):
            own = model.model_json_schema(ref_template="#/components/schemas/{model}")
            own.pop("$defs", None)
            if field:
                own["properties"][field]["maximum"] = backend.context_length - 1
            for name, more in extra.items():
                own["properties"][name].update(more)
            # Token ids exist below the vocabulary size; a suffix needs a FIM-trained model.
            for name in ("prompt", "tokens", "stop_token_ids"):
                _cap_integers(own["properties"].get(name), backend.vocab_size - 1)
            if "suffix" in own["properties"] and not backend.can_infill:
                own["properties"]["suffix"] = {"anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}],
                                               "default": None, "title": "Suffix"}
            comps[model.__name__] = own
    return app.openapi_schema


def _cap_integers(node: Any, maximum: int) -> None:
    """Set `maximum` on every integer schema inside node (the token-id shapes of a prompt)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = maximum
        for v in node.values():
            _cap_integers(v, maximum)
    elif isinstance(node, list):
        for v in node:
            _cap_integers(v, maximum)


CREATED = int(time.time())


async def _complete_events(backend: Backend, prompt: Prompt, params: SamplingParams) -> AsyncIterator[bytes]:
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
