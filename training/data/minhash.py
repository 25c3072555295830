"""MinHash signatures and LSH band keys for near-duplicate removal (pure numpy, no Ray).

The recipe is CodeParrot's (`codeparrot/scripts/minhash_deduplication.py`): a file is the
*set* of its tokens split on `[^A-Za-z_0-9]`, files with fewer than 10 tokens are left
alone, 256 permutations, LSH tuned for Jaccard 0.85.

The signature is bit for bit datasketch's `MinHash(num_perm, seed=1)` (its default
`affine32` scheme: sha1 -> 32 bits, the MurmurHash3 finaliser, then `a*h + b` in uint32,
minimum per permutation); tests/unit/data/test_data_minhash.py checks that. It is
computed here for many files at once with one `minimum.reduceat` over a bounded block of
token hashes instead of one datasketch object per file. The band layout (b bands of r
rows) is datasketch's `MinHashLSH` optimum for the threshold.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Collection, Sequence

import numpy as np

# CodeParrot's tokens are the non-empty pieces between characters outside [A-Za-z_0-9]
# (its regex `[^A-Za-z_0-9]`). Cut on the UTF-8 bytes: every byte that is not [A-Za-z_0-9]
# becomes a space and bytes.split() cuts there. A non-ASCII character's bytes are all >= 0x80,
# so it separates exactly as it does in the regex; the tokens come out as the UTF-8 bytes
# sha1 hashes.
_TOKEN_BYTES = bytes(c if chr(c).isascii() and (chr(c).isalnum() or chr(c) == "_") else 0x20 for c in range(256))
MIN_TOKENS = 10
NUM_PERM = 256
SEED = 1
# Token hashes handled per numpy step: the (tokens x permutations) scratch array, allocated
# once per call and reused (1k x 256 x 4 bytes = 1 MB, which stays in cache), whatever the
# size of one file or batch. A bigger step was slower: a fresh 16 MB array per step costs
# its page faults and cache misses.
_STEP_TOKENS = 1_024

_FMIX = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
_MAX = np.uint32(0xFFFFFFFF)


def tokens(code: str) -> set[bytes]:
    """CodeParrot's `get_tokens` (the set of non-empty pieces between non-identifier chars),
    each in UTF-8 (what the signature hashes), built with two C calls on the bytes instead of
    a regex over the text: pass 1 runs this on every file."""
    return set(code.encode("utf-8", "surrogatepass").translate(_TOKEN_BYTES).split())


@functools.lru_cache(maxsize=4)
def permutations(num_perm: int = NUM_PERM, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters (a odd, b), drawn the same way."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def _fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = _FMIX
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s3)


# UTF-8 token -> sha1_hash32, per process. Code reuses a small vocabulary (keywords, common
# names), so most lookups hit and sha1 runs about once per distinct token per worker.
_CACHE: dict[bytes, int] = {}
_CACHE_MAX = 2_000_000


def _sha1_32(t: bytes) -> int:
    h = int.from_bytes(hashlib.sha1(t).digest()[:4], "little")
    if len(_CACHE) < _CACHE_MAX:
        _CACHE[t] = h
    return h


def token_hashes(toks: Collection[bytes]) -> np.ndarray:
    """sha1's first 4 bytes, little endian (datasketch's sha1_hash32), as uint32."""
    vals = list(map(_CACHE.get, toks))
    if None in vals:
        vals = [_sha1_32(t) if v is None else v for t, v in zip(toks, vals)]
    return np.array(vals, dtype=np.uint32)


def signatures(token_sets: Sequence[set[bytes]], num_perm: int = NUM_PERM, seed: int = SEED) -> np.ndarray:
    """(n, num_perm) uint32 signatures of UTF-8 token sets (`tokens`); an empty set gets all
    0xFFFFFFFF (datasketch's empty)."""
    a, b = permutations(num_perm, seed)
    out = np.full((len(token_sets), num_perm), _MAX, dtype=np.uint32)
    scratch = np.empty((_STEP_TOKENS, num_perm), dtype=np.uint32)
    # Walk files in groups whose tokens fit one step; a file bigger than a step is split
    # over several steps, its minima combined with np.minimum.
    hashes = [_fmix32(token_hashes(s)) if s else np.empty(0, np.uint32) for s in token_sets]
    group: list[tuple[int, np.ndarray]] = []
    size = 0

    def flush() -> None:
        nonlocal group, size
        if not group:
            return
        hv = np.concatenate([h for _, h in group])
        starts = np.cumsum([0] + [len(h) for _, h in group[:-1]])
        perm = scratch[: len(hv)]
        np.multiply(hv[:, None], a[None, :], out=perm)
        np.add(perm, b[None, :], out=perm)
        mins = np.minimum.reduceat(perm, starts, axis=0)
        for (i, _), m in zip(group, mins):
            np.minimum(out[i], m, out=out[i])
        group, size = [], 0

    for i, h in enumerate(hashes):
        for start in range(0, len(h), _STEP_TOKENS):
            piece = h[start:start + _STEP_TOKENS]
            if size + len(piece) > _STEP_TOKENS:
                flush()
            group.append((i, piece))
            size += len(piece)
    flush()
    return out


def jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The MinHash estimate of the Jaccard similarity (datasketch's MinHash.jaccard)."""
    return float(np.count_nonzero(sig_a == sig_b)) / len(sig_a)


@functools.lru_cache(maxsize=8)
def lsh_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band): datasketch MinHashLSH's optimum for the threshold with equal
    weights on false positives and negatives (0.85, 256 -> 13 bands of 19 rows)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[int]:
    """One 63-bit key per band: two files share a key iff that band of their signatures is
    equal (up to a blake2b collision). The band index is hashed in, so band 0 of one file
    never meets band 1 of another."""
    raw = np.ascontiguousarray(sig[: bands * rows], dtype="<u4").tobytes()
    width = rows * 4
    return [int.from_bytes(hashlib.blake2b(raw[i * width:(i + 1) * width], digest_size=8,
                                           salt=i.to_bytes(8, "little")).digest(), "little") >> 1
            for i in range(bands)]
