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
