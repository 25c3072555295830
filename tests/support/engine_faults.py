"""Faults for tests, injected into a real Engine: a request whose prompt holds a marker fails.

    install(engine, marker="#poison#")      # in-process (undo with uninstall(engine))
    CODECOMPLETE_ENGINE_PLUGINS=tests.support.engine_faults  ENGINE_FAULT_MARKER=#poison#
                                            # in a Serve replica (serving/engine/plugins.py)

A text prompt holding the marker fails while it is sampled ("injected test fault"); one
holding the marker followed by "forward" fails in every decode forward pass it takes part
in. So tests can check that one failing request leaves its batch-mates alone. One holding
the marker followed by "slow" makes every decode step it takes part in last SLOW_S longer,
so a test can hold a replica full of requests (load shedding) with a model this small.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

MARKER_ENV = "ENGINE_FAULT_MARKER"
DEFAULT_MARKER = "#poison#"
SLOW_S = 0.05


def fault_of(row: Any, marker: str) -> str:
    """"sample", "forward" or "" for a decode row (serving/engine/output.py's Row)."""
    prompt = row.prompt
    if not (isinstance(prompt, str) and marker in prompt):
        return ""
    if marker + "slow" in prompt:
        return "slow"
    return "forward" if marker + "forward" in prompt else "sample"


def install(engine: Any, marker: Optional[str] = None) -> None:
    """Wrap the engine's sample and forward so that marked requests fail there."""
    marker = marker or os.environ.get(MARKER_ENV) or DEFAULT_MARKER
    sample, forward = engine.sample, engine.forward

    def faulty_sample(logits, rows):
        if any(fault_of(r, marker) == "sample" for r in rows):
            raise RuntimeError("injected test fault (tests/support/engine_faults.py)")
        return sample(logits, rows)

    def faulty_forward(state, rows, next_ids):
        faults = {fault_of(r, marker) for r in rows}
        if "forward" in faults:
            raise RuntimeError("injected test fault in the forward pass (tests/support/engine_faults.py)")
        if "slow" in faults:
            time.sleep(SLOW_S)
        return forward(state, rows, next_ids)

    engine.sample, engine.forward = faulty_sample, faulty_forward


def uninstall(engine: Any) -> None:
    """Back to the engine's own steps."""
    for name in ("sample", "forward"):
        engine.__dict__.pop(name, None)
