"""One request through a threaded DecodeLoop, seen from an asyncio event loop.

The decode loop calls a request's `emit` on its own thread; this hands what it emits to
the event loop, and sets the request's cancel event when the consumer stops before the
end, so the loop drops the row before its next step. The replica (serving/deployment/
replica.py) and LocalBackend (serving/local.py) both serve requests through it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator

from serving.engine.params import Delta, SamplingParams


async def request_steps(decoder: Any, prompt: Any, params: SamplingParams,
                        incremental: bool = True) -> AsyncIterator[list[Delta]]:
    """The request's Deltas as the decode loop produces them: a list each time, of several
    steps when this consumer fell behind; the last list ends with the final Delta.
    ValueError (at the first step) for a request the engine cannot serve; the exception
    that broke its step, raised. Use under `aclosing` so that stopping early cancels at once."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def emit(item: Any) -> None:  # on the decode thread: a step's [Delta or None], None at the end, or an error
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop has closed: nobody is listening (the loop goes on)
            pass

    decoder.submit([prompt], [params], [incremental], emit, cancel=[cancel])
    finished = False
    try:
        while not finished:
            items = [await queue.get()]
            while not queue.empty():  # this consumer fell behind: hand over several steps at once
                items.append(queue.get_nowait())
            for item in items:
                if isinstance(item, BaseException):
                    raise item
            deltas = [item[0] for item in items if isinstance(item, list) and item[0] is not None]
            finished = any(d.finished for d in deltas)
            if None in items and not finished:
                raise RuntimeError("generation ended before the request finished")
            if deltas:
                yield deltas
    finally:
        if not finished:
            cancel.set()
