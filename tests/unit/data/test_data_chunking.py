"""Chunking: exact lengths and contents in both modes, and the tokenizing actor class
(called directly, no Ray) against the course recipe's HF overflow tokenization."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tests.support.corpus import stdlib_files
from training.data.chunking import TokenizeStage, chunk_token_ids, chunks_to_table, tokenizer_threads
from training.data.tokenizer import save_tokenizer, train_tokenizer

EOS = 0


def test_truncate_keeps_full_pieces_of_each_file_and_drops_tails():
    a, b, c = list(range(1, 301)), list(range(1000, 1127)), list(range(2000, 2128))
    chunks = chunk_token_ids([a, b, c, []], 128, "truncate", EOS)
    assert [len(x) for x in chunks] == [128, 128, 128]
    assert chunks[0] == a[:128] and chunks[1] == a[128:256] and chunks[2] == c
    assert EOS not in sum(chunks, [])  # truncate never inserts separators


def test_pack_joins_files_with_eos_and_cuts_full_chunks():
    a, b = list(range(1, 201)), list(range(1000, 1100))
    stream = a + [EOS] + b + [EOS]  # 302 tokens
    chunks = chunk_token_ids([a, b], 128, "pack", EOS)
    assert len(chunks) == 302 // 128 == 2
    assert chunks == [stream[:128], stream[128:256]]


def test_unknown_mode_fails_with_the_field_name():
    with pytest.raises(ValueError, match="data.chunking"):
        chunk_token_ids([[1, 2]], 8, "slide", EOS)


def test_table_is_arrow_native_int32_lists_with_labels_equal_to_input_ids():
    table = chunks_to_table(np.arange(24).reshape(3, 8), "train")
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.column("labels").to_pylist() == table.column("input_ids").to_pylist()
    assert table.column("input_ids").to_pylist()[1] == list(range(8, 16))


def test_threads_cover_the_cores_without_oversubscribing():
    assert tokenizer_threads(1, cores=2) == 2
    assert tokenizer_threads(2, cores=2) == 1
    assert tokenizer_threads(4, cores=2) == 1


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    texts = [f.read_text(encoding="utf-8") for f in stdlib_files(20)]
    tok = train_tokenizer(texts, vocab_size=500)
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok")), tok, texts


def test_actor_truncate_matches_the_seed_exactly(tok_dir):
    path, tok, texts = tok_dir
    out = tok(texts, truncation=True, max_length=128, return_overflowing_tokens=True, return_length=True)
    seed = [ids for n, ids in zip(out["length"], out["input_ids"]) if n == 128]
    stage = TokenizeStage(str(path / "tokenizer.json"), 128, "truncate", tok.eos_token_id, threads=1)
    batch = pa.table({"content": texts, "split": ["train"] * len(texts)})
    result = stage(batch)
    assert sorted(map(tuple, result.column("input_ids").to_pylist())) == sorted(map(tuple, seed))
    assert set(result.column("split").to_pylist()) == {"train"}


def test_actor_pack_carries_the_remainder_across_batches(tok_dir):
    path, tok, texts = tok_dir
    eos = tok.eos_token_id
    stream = [i for t in texts for i in tok(t)["input_ids"] + [eos]]
    stage = TokenizeStage(str(path / "tokenizer.json"), 128, "pack", eos, threads=1, keep_split=False)
    got = []
    for part in (texts[:7], texts[7:8], texts[8:]):  # uneven batches
        table = stage(pa.table({"content": part, "split": ["train"] * len(part)}))
        assert table.column_names == ["input_ids", "labels"]
        got += table.column("input_ids").to_pylist()
    n = len(stream) // 128
    assert got == [stream[i * 128:(i + 1) * 128] for i in range(n)]  # only the last < 128 dropped


def test_actor_keeps_splits_apart_in_pack_mode(tok_dir):
    path, tok, texts = tok_dir
    stage = TokenizeStage(str(path / "tokenizer.json"), 64, "pack", tok.eos_token_id, threads=1)
    splits = ["train" if i % 3 else "valid" for i in range(len(texts))]
    table = stage(pa.table({"content": texts, "split": splits}))
    for split in ("train", "valid"):
        stream = [i for t, s in zip(texts, splits) if s == split for i in tok(t)["input_ids"] + [tok.eos_token_id]]
        rows = [r for r, s in zip(table.column("input_ids").to_pylist(), table.column("split").to_pylist()) if s == split]
        assert rows == [stream[i * 64:(i + 1) * 64] for i in range(len(stream) // 64)]


def test_actor_encodes_a_large_batch_in_slices_with_the_same_chunks(tok_dir, monkeypatch):
    """A batch larger than ENCODE_CHARS is encoded in several calls (texts longer than a slice
    alone included), and the chunks, in order, are those of one whole-batch call."""
    import training.data.chunking as chunking

    path, tok, texts = tok_dir
    batch = pa.table({"content": texts, "split": ["train"] * len(texts)})

    def run(limit: int) -> tuple[list, int]:
        monkeypatch.setattr(chunking, "ENCODE_CHARS", limit)
        stage = TokenizeStage(str(path / "tokenizer.json"), 128, "pack", tok.eos_token_id, threads=1)
        calls, encode = [], stage.encode
        stage.encode = lambda part: calls.append(len(part)) or encode(part)
        return stage(batch).column("input_ids").to_pylist(), len(calls)

    whole, one_call = run(sum(map(len, texts)))
    sliced, calls = run(min(map(len, texts)) + max(map(len, texts)) // 2)
    assert one_call == 1 and calls > 2
    assert sliced == whole and len(whole) > 0
