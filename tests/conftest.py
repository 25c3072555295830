"""Shared fixtures: a small real corpus and a tiny real checkpoint.

Everything here is real: the tokenizer is trained with `tokenizers`, the model is a
GPT-2 trained for a few dozen steps with plain torch, saved as a Hugging Face folder
(safetensors + tokenizer) exactly as the training job saves one.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import sysconfig
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_server(app) -> Iterator[str]:
    """An ASGI app under a real uvicorn on 127.0.0.1 (a free port), in a thread; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def local_client(engine):
    """The FastAPI app around an in-process Engine (LocalBackend, no Ray), as a TestClient."""
    from fastapi.testclient import TestClient

    from app.api import build_app
    from serving.local import LocalBackend

    return TestClient(build_app(LocalBackend(engine)), raise_server_exceptions=False)


# The in-process engine and app, one per test module (module scope, as each module had its own).
@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    from serving.engine import Engine

    return Engine(tiny_checkpoint, num_threads=1)


@pytest.fixture(scope="module")
def client(engine):
    return local_client(engine)


@pytest.fixture(scope="module")
def fim_engine(tiny_fim_checkpoint):
    from serving.engine import Engine

    return Engine(tiny_fim_checkpoint, num_threads=1)


@pytest.fixture(scope="module")
def fim_client(fim_engine):
    return local_client(fim_engine)


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


def stdlib_files(n: int) -> list[Path]:
    """n real, deterministic, medium-sized Python files from the standard library."""
    files = sorted(p for p in STDLIB.glob("*.py") if 2_000 < p.stat().st_size < 60_000)
    return files[:n]


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
    return _train_tiny(tmp_path_factory.mktemp("ckpt") / "model", fim_rate=0.0)


@pytest.fixture(scope="session")
def tiny_fim_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """tiny_checkpoint given the FIM sentinels and trained 30 more steps on data with fim_rate
    0.5 (training/data/fim.py), with its fim.json: a model that has seen the FIM format (the
    tests check the mechanics, not its quality)."""
    return _train_tiny(tmp_path_factory.mktemp("fimckpt") / "model", fim_rate=0.5, start=tiny_checkpoint)


def _train_tiny(out: Path, fim_rate: float, start: Path | None = None) -> Path:
    import numpy as np
    import torch

    from training.config import DataConfig, ModelConfig
    from training.model import build_model
    from training.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    texts = [f.read_text(encoding="utf-8") for f in stdlib_files(60)]
    data = DataConfig(vocab_size=1000, context_length=128)
    torch.manual_seed(0)
    if start is None:
        # End-of-text only, as before FIM existed: the left-to-right checkpoint stays the one
        # the serving tests were written against, and is an "older model" that cannot infill.
        tok = train_tokenizer(texts, vocab_size=data.vocab_size, context_length=data.context_length,
                              fim_tokens=False)
        model = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=64, dropout=0.0), data, tok)
    else:
        from transformers import GPT2LMHeadModel

        from training.tokenizer import FIM_TOKENS

        tok, model = load_tokenizer(start), GPT2LMHeadModel.from_pretrained(str(start))
        tok.add_special_tokens({"additional_special_tokens": list(FIM_TOKENS)})
        model.resize_token_embeddings(len(tok))
    ids = torch.tensor([i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]])
    n = (len(ids) // 128) * 128
    chunks = labels = ids[:n].view(-1, 128)
    if fim_rate > 0:
        from training.data.fim import codec_from_file, fim_chunks
        from training.export import write_fim_metadata

        save_tokenizer(tok, out)
        codec, fim = codec_from_file(str(out / "tokenizer.json"), lambda s: tok(s)["input_ids"])
        inputs, targets = fim_chunks(chunks.numpy().astype(np.int32), 0, codec, fim, fim_rate, 0.5)
        chunks, labels = torch.as_tensor(inputs, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60 if start is None else 30):
        pick = torch.randint(len(chunks), (16,), generator=g)
        loss = model(input_ids=chunks[pick], labels=labels[pick]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tok, out)
    if fim_rate > 0:
        write_fim_metadata(out, fim_rate, 0.5)
    return out
