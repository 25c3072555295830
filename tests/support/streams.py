"""Reading what a decode loop or an SSE response handed out."""

from __future__ import annotations

import json


def absorb(step, texts: list, finals: dict) -> None:
    """One decode step's Deltas (one per request, or None) into the requests' texts and,
    for those that finished, their final Delta."""
    for i, d in enumerate(step):
        if d is not None:
            texts[i] += d.text
            if d.finished:
                finals[i] = d


def sse_events(text: str) -> list:
    """The `data:` events of an SSE body, JSON-decoded ("[DONE]" kept as the string)."""
    return [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
            for line in text.splitlines() if line.startswith("data: ")]


def stream_batch(engine, prompts, params, incremental=None):
    """One fixed batch through the engine's DecodeLoop, stepped on this thread: yields, once
    per step, one entry per request (its new Delta, or None). Each request ends with exactly
    one Delta whose `finished` is True."""
    from serving.engine.scheduler import DecodeLoop

    items: list = []
    loop = DecodeLoop(engine, max_rows=len(prompts), threaded=False)
    loop.submit(prompts, params, list(incremental) if incremental is not None else [True] * len(prompts),
                items.append)
    while not loop.idle():
        loop.step()
        step = [None] * len(prompts)
        for item in items:
            if isinstance(item, BaseException):
                raise item
            for i, d in enumerate(item or ()):
                if d is not None:
                    step[i] = d
        items.clear()
        yield step
