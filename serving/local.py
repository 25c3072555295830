"""An in-process Backend for the FastAPI app: the Engine without Ray, one request at a time.

For unit tests of the HTTP layer and for debugging the app without a cluster. It does not
batch; the Serve deployment (serving/deployment/replica.py) is what production runs.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from serving.engine.engine import Engine
from serving.engine.params import Delta, SamplingParams


class LocalBackend:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.model_name = engine.model_name
        self.context_length = engine.context_length
        self.vocab_size = engine.vocab_size
        self.can_infill = engine.fim is not None
        self.tokenize, self.detokenize = engine.tokenize, engine.detokenize

    def ready(self) -> bool:
        return True

    async def stream(self, prompt: Any, params: SamplingParams, incremental: bool = True) -> AsyncIterator[Delta]:
        steps = self.engine.stream_batch([prompt], [params], incremental=[incremental])
        while True:
            # A worker thread per step keeps the event loop free, as in the deployment.
            step = await asyncio.to_thread(next, steps, None)
            if step is None:
                return
            d = step[0]
            if d is not None:
                yield d
                if d.finished:
                    return
