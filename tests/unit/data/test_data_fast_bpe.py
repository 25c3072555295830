"""The tiktoken encoder is used only where it gives the very ids `tokenizers` gives:
checked here on real standard-library code, and the fallback on tokenizers of another
shape (the actor must still chunk correctly with them)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from tokenizers import Tokenizer

from tests.support.corpus import STDLIB, stdlib_files
from training.data.chunking import TokenizeStage
from training.data.fast_bpe import load_fast_bpe
from training.data.tokenizer import save_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    texts = [f.read_text(encoding="utf-8") for f in stdlib_files(30)]
    return save_tokenizer(train_tokenizer(texts, vocab_size=2000), tmp_path_factory.mktemp("tok"))


def held_out_code(n: int) -> list[str]:
    """Files the tokenizer never saw, of every size, plus edge cases."""
    files = sorted(p for p in STDLIB.glob("*.py") if p.stat().st_size < 200_000)[-n:]
    texts = [f.read_text(encoding="utf-8") for f in files]
    return texts + ["", " ", "\n\n\t  \r\n", "x<|endoftext|>y", "naïve = 'ß' * 3  # 🐍\u2028",
                    "    " * 40 + "return", "'s 're 'll 'd 've 'm 't"]


def test_tiktoken_encodes_exactly_like_tokenizers_on_real_code(tok_dir):
    enc, reason = load_fast_bpe(tok_dir / "tokenizer.json")
    assert enc is not None, reason
    ref = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    texts = held_out_code(120)
    ours = enc.encode_batch(texts, num_threads=2, allowed_special="all")
    theirs = [e.ids for e in ref.encode_batch_fast(texts)]
    assert sum(map(len, theirs)) > 100_000
    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert mismatched == []
    assert ours[-4][1] == 0  # the literal end-of-text marker is the special token, as in HF


def edited(tok_dir: Path, tmp_path: Path, change) -> Path:
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    change(spec)
    out = tmp_path / "edited"
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out / "tokenizer.json"


def swap_two_merges(spec):
    m = spec["model"]["merges"]
    m[10], m[11] = m[11], m[10]


@pytest.mark.parametrize("change, reason", [
    (lambda s: s.__setitem__("normalizer", {"type": "NFC"}), "normalizer"),
    (swap_two_merges, "merge order"),
    (lambda s: s["pre_tokenizer"].__setitem__("add_prefix_space", True), "ByteLevel"),
])
def test_another_shape_of_tokenizer_falls_back_to_tokenizers(tok_dir, tmp_path, change, reason):
    path = edited(tok_dir, tmp_path, change)
    enc, why = load_fast_bpe(path)
    assert enc is None and reason in why
    # The actor still tokenizes with that exact tokenizer, through `tokenizers`.
    stage = TokenizeStage(str(path), 64, "truncate", 0, threads=1)
    assert stage.fast is None
    texts = held_out_code(5)[:5]
    table = stage(pa.table({"content": texts, "split": ["train"] * 5}))
    ids = [e.ids for e in Tokenizer.from_file(str(path)).encode_batch(texts)]
    expected = [x[i:i + 64] for x in ids for i in range(0, len(x) - 63, 64)]
    assert table.column("input_ids").to_pylist() == expected


def test_actor_uses_tiktoken_for_the_jobs_own_tokenizer(tok_dir):
    stage = TokenizeStage(str(tok_dir / "tokenizer.json"), 128, "truncate", 0, threads=1)
    assert stage.fast is not None and stage.tok is None
