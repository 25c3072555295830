"""Deterministic train/validation split by a hash of each file's key.

The key is the file's relative path (folders) or `repo_name/path` (CodeParrot rows), so a
file lands in the same split on every run, on every machine, whatever order the stream
delivers it in. With dedup on, the key is the content hash instead: every copy of a file
then lands in the same split whichever copy survives, which keeps the split deterministic
and keeps duplicates from leaking between train and validation (CodeParrot's reason for
deduplicating at all).
"""

from __future__ import annotations

import hashlib

TRAIN, VALID = "train", "valid"
_SCALE = float(1 << 64)


def key_fraction(key: str) -> float:
    """A stable number in [0, 1) for a key (blake2b, not Python's salted hash())."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def split_of(key: str, valid_fraction: float) -> str:
    return VALID if key_fraction(key) < valid_fraction else TRAIN


def content_key(content: str) -> str:
    """Hex digest of a file's text: the dedup identity and, with dedup on, the split key."""
    return hashlib.blake2b(content.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
