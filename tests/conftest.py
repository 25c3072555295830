"""Shared fixtures: a small real corpus, a tiny real checkpoint, the engine and app around it.

Everything here is real (tests/support/checkpoints.py says how the checkpoint is made);
the helpers the fixtures use live in tests/support/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support.checkpoints import train_tiny  # noqa: E402
from tests.support.corpus import stdlib_files  # noqa: E402
from tests.support.servers import local_client  # noqa: E402


# The in-process engine and app, one per test module (module scope, as each module had its own).
@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    from serving.engine.engine import Engine

    return Engine(tiny_checkpoint, num_threads=1)


@pytest.fixture(scope="module")
def client(engine):
    return local_client(engine)


@pytest.fixture(scope="module")
def fim_engine(tiny_fim_checkpoint):
    from serving.engine.engine import Engine

    return Engine(tiny_fim_checkpoint, num_threads=1)


@pytest.fixture(scope="module")
def fim_client(fim_engine):
    return local_client(fim_engine)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A folder of 40 real .py files, nested one level, nothing broken."""
    root = tmp_path_factory.mktemp("corpus")
    for i, f in enumerate(stdlib_files(40)):
        sub = root / ("pkg_a" if i % 2 else "pkg_b")
        sub.mkdir(exist_ok=True)
        (sub / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A GPT-2 (2 layers, 64 wide, 128 context) trained ~60 steps on stdlib code."""
    return train_tiny(tmp_path_factory.mktemp("ckpt") / "model", fim_rate=0.0)


@pytest.fixture(scope="session")
def tiny_fim_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """tiny_checkpoint given the FIM sentinels and trained 30 more steps on data with fim_rate
    0.5 (training/data/fim.py), with its fim.json: a model that has seen the FIM format (the
    tests check the mechanics, not its quality)."""
    return train_tiny(tmp_path_factory.mktemp("fimckpt") / "model", fim_rate=0.5, start=tiny_checkpoint)
