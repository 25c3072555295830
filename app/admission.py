"""Load shedding: a replica holds a bounded number of rows, and answers the rest at once.

A replica decodes up to `max_batch_size` rows together and keeps up to `max_queued` more
waiting for a place in the batch. A request that would take it past that is answered
503 with `Retry-After` straight away, in the OpenAI error shape, instead of joining a queue
that only grows: under a burst far beyond capacity every client then either gets its
completion within a bounded time or learns at once that it should back off (the `openai`
client retries a 503 by itself, honouring `Retry-After`).

Why 503 and not 429: 429 is the field's "you, this caller, are over your rate limit"
(OpenAI's own meaning, and TGI's for a full server); 503 says the server as a whole is
overloaded, which is OpenAI's documented answer for an overloaded engine and what Ray
Serve's proxy itself answers when its queue is full. Both are retried by the usual clients.

Places are counted in rows (a request with `n: 4` holds four) and given back when the
response ends, however it ends: a client that hangs up while its request waits frees its
place at once (the decode loop drops the row before it is ever prefilled).
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.errors import APIError


class AdmissionGate:
    """Rows admitted and not yet answered, against a capacity (None: unbounded)."""

    def __init__(self, capacity: Optional[int], retry_after_s: int = 1):
        self.capacity, self.retry_after_s = capacity, max(1, int(retry_after_s))
        self.held = 0  # rows of requests being answered now
        self.rejected = 0  # requests answered 503 since start

    @classmethod
    def for_backend(cls, backend: Any) -> "AdmissionGate":
        """The gate a backend asks for: its `max_rows_in_flight` (absent or None: no limit)."""
        return cls(getattr(backend, "max_rows_in_flight", None), getattr(backend, "retry_after_s", 1))

    def enter(self, rows: int) -> "Ticket":
        """A ticket for `rows` more rows, or APIError 503 with Retry-After when they do not fit.
        A request larger than the whole capacity is let in alone rather than never."""
        if self.capacity is not None and self.held > 0 and self.held + rows > self.capacity:
            self.rejected += 1
            raise APIError(503, f"server overloaded: {self.held} completion rows are decoding or waiting "
                                f"(this replica holds at most {self.capacity}); retry after "
                                f"{self.retry_after_s} s", None, headers={"Retry-After": str(self.retry_after_s)})
        self.held += rows
        return Ticket(self, rows)


class Ticket:
    """The places one request holds; `release()` gives them back (once, however often called)."""

    def __init__(self, gate: AdmissionGate, rows: int):
        self._gate, self._rows = gate, rows

    def release(self) -> None:
        if self._rows:
            self._gate.held -= self._rows
            self._rows = 0


class GatedStreamingResponse(StreamingResponse):
    """A streaming response that gives its ticket back when it ends, is cancelled (the client
    hung up) or fails. Released around the whole ASGI call, not in the body's generator,
    since a generator that never started (a client gone before the headers) runs no `finally`."""

    def __init__(self, content: Any, ticket: Ticket, **kwargs: Any):
        super().__init__(content, **kwargs)
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()
            await _close(self.body_iterator)


async def _close(iterator: Any) -> None:
    """Close the body's generator, so the stream under it cancels its rows at once."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # closing a stream that already failed: nothing more to do
            pass
