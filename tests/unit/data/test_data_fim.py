"""The FIM transform on real tokenizer output: format, lengths, labels, character-safe
splits and seeding. The Ray Data wiring is tested in test_data_pipeline.py."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.support.corpus import stdlib_files
from training.data.fim import IGNORE, _split_edges, chunk_rng, codec_from_file, fim_chunks, fim_transform
from training.data.tokenizer import FIM_TOKENS, save_tokenizer, train_tokenizer

CTX = 128
UNICODE = "def grüße(名前):\n    return f'¡hola {名前}! 🐍 café — ünïcödé'  # 中文注释\n" * 40


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> str:
    texts = [f.read_text(encoding="utf-8") for f in stdlib_files(20)] + [UNICODE]
    folder = save_tokenizer(train_tokenizer(texts, vocab_size=600), tmp_path_factory.mktemp("tok"))
    return str(folder / "tokenizer.json")


@pytest.fixture(scope="module")
def codec(tok_file):
    tok = Tokenizer.from_file(tok_file)
    return codec_from_file(tok_file, lambda s: tok.encode(s, add_special_tokens=False).ids)


def chunks_of(codec, text: str, ctx: int = CTX) -> np.ndarray:
    ids = np.asarray(codec[0].encode(text), dtype=np.int32)
    n = len(ids) // ctx
    return ids[: n * ctx].reshape(n, ctx)


def to_bytes(codec, ids) -> bytes:
    return b"".join(codec[0].token_bytes[i] for i in ids)


def parts(codec, ids: np.ndarray, labels: np.ndarray) -> tuple[str, bytes, bytes, bytes]:
    """(format, prefix, middle, suffix) bytes of a FIM chunk, from its sentinels."""
    c, f = codec
    n = int((labels != IGNORE).sum())
    assert (ids[n:] == f.pad).all() and (labels[:n] == ids[:n]).all()
    body = list(ids[:n])
    assert body[0] == f.prefix and body.count(f.middle) == 1 and body.count(f.suffix) == 1
    m = body.index(f.middle)
    if body[1] == f.suffix:  # SPM: <P><S> suffix <M> prefix middle (prefix/middle boundary unknown)
        return "spm", b"", to_bytes(codec, body[m + 1:]), to_bytes(codec, body[2:m])
    s = body.index(f.suffix)
    return "psm", to_bytes(codec, body[1:s]), to_bytes(codec, body[m + 1:]), to_bytes(codec, body[s + 1:m])


def test_tokenizer_has_the_sentinels_beside_end_of_text(tok_file):
    tok = Tokenizer.from_file(tok_file)
    ids = [tok.token_to_id(t) for t in ("<|endoftext|>", *FIM_TOKENS)]
    assert ids == [0, 1, 2, 3, 4]
    # a sentinel is one token, never merged with the text around it
    assert tok.encode("x<fim_middle>y", add_special_tokens=False).ids[1] == ids[2]


def test_rate_zero_keeps_chunks_and_rate_one_rewrites_every_chunk_to_the_context_length(codec):
    chunks = chunks_of(codec, "".join(f.read_text() for f in stdlib_files(3)))
    same_in, same_lab = fim_chunks(chunks, 0, *codec, fim_rate=0.0, spm_rate=0.5)
    assert (same_in == chunks).all() and (same_lab == chunks).all()
    inputs, labels = fim_chunks(chunks, 0, *codec, fim_rate=1.0, spm_rate=0.5)
    assert inputs.shape == labels.shape == chunks.shape
    fmts = Counter()
    for row_in, row_lab, orig in zip(inputs, labels, chunks):
        if (row_in == orig).all():  # suffix too short to absorb the sentinels: kept left to right
            continue
        fmt, prefix, middle, suffix = parts(codec, row_in, row_lab)
        fmts[fmt] += 1
        whole = to_bytes(codec, orig)
        if fmt == "psm":  # the suffix lost its far end only: the rest is the original, in order
            assert whole.startswith(prefix + middle + suffix)
        else:  # SPM: suffix first, then prefix+middle, which is the original's start
            assert whole.startswith(middle) and whole[len(middle):].startswith(suffix)
    assert fmts["psm"] > 3 and fmts["spm"] > 3


def test_short_chunks_are_padded_with_fim_pad_ignored_by_the_loss(codec):
    # Re-encoding usually adds tokens (plus three sentinels), so padding is rare on real
    # chunks; a chunk spelled byte by byte re-encodes much shorter and must be padded.
    c, f = codec
    row = np.asarray([c.byte_ids[b] for b in b"def hello_world():\n    return self.value\n" * 2][:40], dtype=np.int32)
    padded = 0
    for seed in range(40):
        out = fim_transform(row, chunk_rng(seed, row), c, f, 1.0, 0.5)
        if out is None:
            continue
        ids, labels = out
        pads = ids == f.pad
        assert (labels[pads] == IGNORE).all() and (labels[~pads] == ids[~pads]).all()
        if pads.any():
            padded += 1
            first = int(np.argmax(pads))
            assert pads[first:].all()  # padding only at the end
    assert padded > 0


def test_splits_never_fall_inside_a_multibyte_character(codec):
    c, f = codec
    # Spelled byte by byte and cut every 37 bytes: chunk edges fall inside characters.
    raw = np.asarray([c.byte_ids[b] for b in UNICODE.encode()], dtype=np.int32)
    chunks = raw[: len(raw) // 37 * 37].reshape(-1, 37)
    assert any(not _is_utf8(to_bytes(codec, r)) for r in chunks)  # the test does hit cut edges
    for seed in range(10):
        inputs, labels = fim_chunks(chunks, seed, c, f, fim_rate=1.0, spm_rate=0.0)
        for row_in, row_lab, orig in zip(inputs, labels, chunks):
            if (row_in == orig).all():
                continue
            _, prefix, middle, suffix = parts(codec, row_in, row_lab)
            middle.decode("utf-8")  # raises if the cut fell inside a character
            assert to_bytes(codec, orig).startswith(prefix + middle + suffix)


def test_split_edges_keeps_cut_characters_as_raw_bytes():
    data = "é中🐍".encode()
    assert _split_edges(data[1:-2]) == (data[1:2], "中", data[-4:-2])
    assert _split_edges(b"abc") == (b"", "abc", b"")


def test_same_seed_same_chunks_other_seed_other_chunks(codec):
    chunks = chunks_of(codec, "".join(f.read_text() for f in stdlib_files(2)))
    a = fim_chunks(chunks, 7, *codec, fim_rate=0.5, spm_rate=0.5)
    b = fim_chunks(chunks[::-1].copy(), 7, *codec, fim_rate=0.5, spm_rate=0.5)  # order does not matter
    assert (a[0] == b[0][::-1]).all() and (a[1] == b[1][::-1]).all()
    c = fim_chunks(chunks, 8, *codec, fim_rate=0.5, spm_rate=0.5)
    assert not (a[0] == c[0]).all()
    changed = sum(not (r == o).all() for r, o in zip(a[0], chunks))
    assert 0.2 * len(chunks) < changed < 0.8 * len(chunks)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
