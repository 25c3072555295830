"""Fixtures of the engine's tests."""

from __future__ import annotations

import pytest

from tests.support import engine_faults


@pytest.fixture
def faulty(engine):
    """The module's engine with faults for prompts holding "#poison#" (tests/support/engine_faults.py)."""
    engine_faults.install(engine, marker="#poison#")
    yield engine
    engine_faults.uninstall(engine)
