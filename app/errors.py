"""Every failure as JSON: `{"error": {"message", "type", "field", "param", "code"}}`.

The shape is OpenAI's error object (so the `openai` client raises a typed error with the
message) plus `field`, the name of the offending request field. Validation failures are
4xx; a 5xx means a bug in the server, never a bad request.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.schemas import MAX_BODY_BYTES
from serving.engine.params import GenerationError

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "request_timeout", 413: "request_too_large",
               415: "invalid_request_error", 422: "invalid_request_error", 503: "service_unavailable",
               500: "server_error"}


class APIError(Exception):
    """Raised by routes for a request that parses but cannot be served as asked."""

    def __init__(self, status: int, message: str, field: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def error_body(status: int, message: str, field: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "field": field, "param": field, "code": status}}


def failure_body(exc: BaseException) -> dict[str, Any]:
    """A 500 body for one failed request, with an id that is also in the server's log."""
    rid = f"req-{uuid.uuid4().hex[:16]}"
    what = "generation failed" if isinstance(exc, GenerationError) else "internal error"
    log.error("request %s: %s: %s: %s", rid, what, type(exc).__name__, exc)
    body = error_body(500, f"{what}: {type(exc).__name__} (request id {rid})")
    body["error"]["request_id"] = rid
    return body


def failure_response(exc: BaseException) -> JSONResponse:
    body = failure_body(exc)
    return JSONResponse(body, status_code=500, headers={"X-Request-Id": body["error"]["request_id"]})


def error_response(status: int, message: str, field: Optional[str] = None,
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, field), status_code=status, headers=headers)


def describe_validation_error(exc: RequestValidationError) -> tuple[int, str, Optional[str]]:
    """(status, message, field) for the first problem pydantic/FastAPI found in the body."""
    errors = exc.errors()
    if not errors:
        return 422, "invalid request", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return 400, f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})", "body"
    if not loc:  # the body as a whole: missing, or not an object
        if kind == "missing":
            return 400, "request body is required (a JSON object)", "body"
        if isinstance(err.get("input"), (bytes, bytearray)):
            # FastAPI parses JSON only when the client says so (a CSRF guard for a
            # service on localhost): say what to send instead of "not a dict".
            return 415, "send the body as JSON with 'Content-Type: application/json'", "body"
        return 422, f"request body must be a JSON object: {err.get('msg', '')}", "body"
    field = loc[0]
    path = ".".join(loc)
    msg = err.get("msg", "invalid value")
    if kind == "extra_forbidden":
        return 422, f"unknown field '{path}'", field
    if kind == "missing":
        return 422, f"field '{path}' is required", field
    # pydantic prefixes custom validator messages with "Value error, ".
    msg = msg.removeprefix("Value error, ")
    return 422, f"{path}: {msg}", field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, message, field = describe_validation_error(exc)
        return error_response(status, message, field)

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.field, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, headers=getattr(exc, "headers", None))

    @app.exception_handler(GenerationError)
    async def _failed(_: Request, exc: GenerationError) -> JSONResponse:
        return failure_response(exc)  # this request's decoding failed (alone): its own 500

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return failure_response(exc)


# A body that has not arrived this long after the request did is a 408, not a request that
# waits for ever: a stalled client, or (seen under Ray Serve 2.60) a request the proxy re-sent
# to a new replica after its first replica died, whose body the proxy then never delivered.
BODY_TIMEOUT_S = 30.0


class BodyLimitMiddleware:
    """Reject bodies over `limit` bytes with 413 before anything parses them, and bodies that
    do not arrive within `timeout_s` with 408.

    Checks Content-Length up front and also counts a chunked body as it arrives (buffered:
    bodies here are small), so a client cannot make the server hold an unbounded body.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES, timeout_s: Optional[float] = None):
        self.app, self.limit = app, limit
        self.timeout_s = BODY_TIMEOUT_S if timeout_s is None else timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_big = error_response(413, f"request body is larger than {self.limit} bytes", "body")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.limit:
                        await too_big(scope, receive, send)
                        return
                except ValueError:
                    await error_response(400, "invalid Content-Length header", "body")(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s  # for the whole body, not each chunk
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                log.warning("request body not received within %g s: answered 408", self.timeout_s)
                await error_response(408, f"request body not received within {self.timeout_s:g} s",
                                     "body")(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await too_big(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for disconnect, as the server would

        await self.app(scope, replay, send)
