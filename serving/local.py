"""An in-process Backend for the FastAPI app: the Engine and its DecodeLoop, without Ray.

For unit tests of the HTTP layer and for debugging the app without a cluster. Requests run
through the same DecodeLoop a replica runs (serving/engine/scheduler.py), on its own thread,
so concurrent requests batch as they do in the service; what the Serve deployment adds
(serving/deployment/replica.py) is Ray, the stream interval and the metrics.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from serving.engine.engine import Engine
from serving.engine.params import Delta, SamplingParams
from serving.engine.scheduler import DecodeLoop
from serving.engine.streams import request_steps


class LocalBackend:
    def __init__(self, engine: Engine, max_rows: int = 64, max_queued: int = -1, retry_after_s: int = 1):
        self.engine = engine
        self.model_name = engine.model_name
        self.context_length = engine.context_length
        self.vocab_size = engine.vocab_size
        self.can_infill = engine.fim is not None
        self.tokenize, self.detokenize = engine.tokenize, engine.detokenize
        self.decoder = DecodeLoop(engine, max_rows=max_rows)
        # The app's admission gate (app/admission.py): unbounded unless asked, as in unit tests.
        self.max_rows_in_flight = None if max_queued < 0 else max_rows + max_queued
        self.retry_after_s = retry_after_s

    def ready(self) -> bool:
        return True

    async def stream(self, prompt: Any, params: SamplingParams, incremental: bool = True) -> AsyncIterator[Delta]:
        async with aclosing(request_steps(self.decoder, prompt, params, incremental)) as steps:
            async for deltas in steps:
                for d in deltas:
                    yield d
