"""An in-process Backend for the FastAPI app: an engine without Ray.

For unit tests of the HTTP layer and for debugging the app without a cluster. Requests run
through the same engine interface a replica serves (serving/engine/engines.py): the native
Engine's DecodeLoop on its own thread (concurrent requests batch as in the service), or the
vLLM engine; what the Serve deployment adds (serving/deployment/replica.py) is Ray, the
stream interval and the metrics.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from serving.engine.engines import NativeServing
from serving.engine.params import Delta, SamplingParams


class LocalBackend:
    def __init__(self, engine: Any, max_rows: int = 64, max_queued: int = -1, retry_after_s: int = 1):
        """`engine`: a native Engine (wrapped in its DecodeLoop here) or a ServingEngine."""
        self.serving = engine if hasattr(engine, "steps") else NativeServing(engine, max_rows=max_rows)
        self.engine = engine
        self.model_name = self.serving.model_name
        self.context_length = self.serving.context_length
        self.vocab_size = self.serving.vocab_size
        self.can_infill = self.serving.can_infill
        self.tokenize, self.detokenize = self.serving.tokenize, self.serving.detokenize
        self.decoder = getattr(self.serving, "decoder", None)
        # The app's admission gate (app/admission.py): unbounded unless asked, as in unit tests.
        self.max_rows_in_flight = None if max_queued < 0 else max_rows + max_queued
        self.retry_after_s = retry_after_s

    def ready(self) -> bool:
        return True

    async def stream(self, prompt: Any, params: SamplingParams, incremental: bool = True) -> AsyncIterator[Delta]:
        async with aclosing(self.serving.steps(prompt, params, incremental)) as steps:
            async for deltas in steps:
                for d in deltas:
                    yield d
