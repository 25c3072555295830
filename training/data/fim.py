"""Fill-in-the-middle: rewrite a training chunk so the model learns to infill.

Bavarian et al. 2022 ("Efficient Training of Language Models to Fill in the Middle") and
bigcode's Megatron-LM `permute()` (SantaCoder, StarCoder). With probability `fim_rate` a
chunk's text is cut at two uniformly random *character* positions into prefix / middle /
suffix, each part is re-encoded, and the chunk becomes

    PSM:  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM:  <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle   (StarCoder's SPM)

SPM is chosen with probability `fim_spm_rate`. Re-encoding the three parts separately
plus three sentinels usually makes the chunk longer than the context: the suffix is then
cut from its far end (the side away from the hole), as bigcode does; if the suffix is too
short to absorb the excess, the chunk stays left to right. A chunk that came out shorter
is padded at the end with `<fim_pad>`, whose label is -100 so the loss ignores it.

Context-level (one 128-token chunk at a time), not document-level: see docs/data.md.

The random draws come from a generator seeded with (seed, the chunk's bytes), so the
result depends only on the seed and the chunk, not on which actor or batch saw it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from training.fim_format import MIDDLE, PAD, PREFIX, SENTINELS, SUFFIX

IGNORE = -100  # the label Hugging Face's loss skips


@dataclass(frozen=True)
class FimIds:
    prefix: int
    middle: int
    suffix: int
    pad: int


@dataclass(frozen=True)
class Codec:
    """What the transform needs of a tokenizer: each id's bytes, and text -> ids."""
    token_bytes: Sequence[bytes]     # id -> the bytes it stands for (specials: their spelling)
    encode: Callable[[str], list[int]]
    byte_ids: Sequence[int]          # byte value -> the id of the single-byte token
    encode_batch: Optional[Callable[[list[str]], list[list[int]]]] = None  # the same, many at once


def chunk_rng(seed: int, ids: np.ndarray) -> np.random.Generator:
    digest = hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int32).tobytes(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def _split_edges(data: bytes) -> tuple[bytes, str, bytes]:
    """(leading continuation bytes, decodable text, trailing incomplete character).

    A chunk boundary may fall inside a multi-byte character: its pieces stay raw bytes
    at the chunk's edges and are never split further."""
    start = 0
    while start < len(data) and start < 3 and 0x80 <= data[start] < 0xC0:
        start += 1
    end = len(data)
    for back in range(1, min(4, len(data) - start) + 1):
        b = data[end - back]
        if b < 0x80:
            break
        if b >= 0xC0:  # a lead byte: complete only if followed by enough continuation bytes
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if back < need:
                end -= back
            break
    return data[:start], data[start:end].decode("utf-8"), data[end:]


@dataclass
class _Plan:
    """One chunk's draws: the format and the three texts to encode (edges kept as bytes)."""
    spm: bool
    head: bytes
    parts: tuple[str, str, str]  # prefix, middle, suffix text
    tail: bytes


def _plan(ids: np.ndarray, rng: np.random.Generator, codec: Codec, fim_rate: float,
          spm_rate: float) -> Optional[_Plan]:
    if rng.random() >= fim_rate:
        return None
    spm = rng.random() < spm_rate
    try:
        head, text, tail = _split_edges(b"".join(codec.token_bytes[i] for i in ids))
    except UnicodeDecodeError:  # not UTF-8 inside: nothing sensible to split
        return None
    lo, hi = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    return _Plan(spm, head, (text[:lo], text[lo:hi], text[hi:]), tail)


def _assemble(plan: _Plan, encoded: Sequence[list[int]], ctx: int, codec: Codec, fim: FimIds,
              dtype) -> Optional[tuple[np.ndarray, np.ndarray]]:
    prefix = [codec.byte_ids[b] for b in plan.head] + list(encoded[0])
    middle = list(encoded[1])
    suffix = list(encoded[2]) + [codec.byte_ids[b] for b in plan.tail]
    excess = len(prefix) + len(middle) + len(suffix) + 3 - ctx
    if excess > 0:
        if len(suffix) < excess:
            return None
        suffix = suffix[: len(suffix) - excess]
    if plan.spm:
        out = [fim.prefix, fim.suffix, *suffix, fim.middle, *prefix, *middle]
    else:
        out = [fim.prefix, *prefix, fim.suffix, *suffix, fim.middle, *middle]
    n = len(out)
    input_ids = np.full(ctx, fim.pad, dtype=dtype)
    input_ids[:n] = out
    labels = input_ids.copy()
    labels[n:] = IGNORE
    return input_ids, labels


def fim_transform(ids: np.ndarray, rng: np.random.Generator, codec: Codec, fim: FimIds,
                  fim_rate: float, spm_rate: float) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) of the FIM version of `ids`, or None to keep it left to right."""
    plan = _plan(ids, rng, codec, fim_rate, spm_rate)
    if plan is None:
        return None
    return _assemble(plan, [codec.encode(t) for t in plan.parts], len(ids), codec, fim, ids.dtype)


def fim_chunks(chunks: np.ndarray, seed: int, codec: Codec, fim: FimIds, fim_rate: float,
               spm_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """A (n, ctx) array of chunks -> (input_ids, labels), each chunk seeded by its content.
    The texts of all rewritten chunks are encoded in one batch call (codec.encode_batch)."""
    inputs, labels = chunks.copy(), chunks.copy()
    if fim_rate <= 0 or not len(chunks):
        return inputs, labels
    plans = [(i, p) for i, row in enumerate(chunks)
             if (p := _plan(row, chunk_rng(seed, row), codec, fim_rate, spm_rate)) is not None]
    texts = [t for _, p in plans for t in p.parts]
    encoded = codec.encode_batch(texts) if codec.encode_batch else [codec.encode(t) for t in texts]
    for k, (i, plan) in enumerate(plans):
        done = _assemble(plan, encoded[3 * k:3 * k + 3], chunks.shape[1], codec, fim, chunks.dtype)
        if done is not None:
            inputs[i], labels[i] = done
    return inputs, labels


def codec_from_file(tokenizer_file: str, encode: Callable[[str], list[int]],
                    encode_batch: Optional[Callable[[list[str]], list[list[int]]]] = None) -> tuple[Codec, FimIds]:
    """The Codec and sentinel ids of a tokenizer.json (byte-level BPE)."""
    from tokenizers import Tokenizer

    from training.data.fast_bpe import _byte_of_char

    tok = Tokenizer.from_file(tokenizer_file)
    vocab = tok.get_vocab(with_added_tokens=True)
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    missing = [s for s in SENTINELS if s not in vocab]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)} token (needed for fill-in-the-middle)")
    byte_of = _byte_of_char()
    table: list[bytes] = [b""] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        table[i] = piece.encode("utf-8") if piece in specials else bytes(byte_of[c] for c in piece)
    byte_ids = [vocab[c] for c, _ in sorted(byte_of.items(), key=lambda cb: cb[1])]
    return (Codec(token_bytes=table, encode=encode, byte_ids=byte_ids, encode_batch=encode_batch),
            FimIds(*(vocab[s] for s in (PREFIX, MIDDLE, SUFFIX, PAD))))
