"""A faster encoder for the same byte-level BPE: tiktoken, used only where it is exact.

Tokenizing is most of the data stage's work. The tokenizer the job trains (and GPT-2's)
is a plain byte-level BPE: the GPT-2 split regex, then merges applied by rank. tiktoken
implements exactly that algorithm in Rust and encodes code several times faster than the
`tokenizers` library on one core, so the tokenizer actors use it when the
`tokenizer.json` has that shape and fall back to `tokenizers` otherwise.

"Exact" is checked, not assumed: `load_fast_bpe` accepts a tokenizer only if
- the model is BPE with no dropout, subword prefix/suffix or byte fallback, the
  pre-tokenizer is ByteLevel with the GPT-2 regex and no prefix space, no normalizer;
- every merge's result has a larger id than the merges before it (tiktoken ranks
  tokens by id; HF applies merges in list order, so the two orders must agree);
- it encodes a probe text (code, unicode, whitespace runs, the special token) to the
  very ids that `tokenizers` gives.
The data tests compare the two on real files as well.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

# GPT-2's pre-tokenizer split, as tokenizers' ByteLevel(use_regex=True) applies it.
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

PROBE = (
    "def f(x, y=None):\n    \"\"\"Docstring — ünïcödé, 中文, emoji 🐍.\"\"\"\n\tif x is not None:\n"
    "        return x ** 2  # it's they'll we've I'm 12345 0x1F\n\n\n    else:   \r\n"
    "        raise ValueError(f'{y!r}')<|endoftext|>class A(B): pass\n  \n"
)


@lru_cache(maxsize=None)
def _byte_of_char() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def why_not_fast(spec: dict) -> Optional[str]:
    """None if tokenizer.json (parsed) is a plain byte-level BPE, else the reason."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"model is {model.get('type')}, not BPE"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback"):
        return "BPE has dropout, a subword prefix/suffix or byte fallback"
    if spec.get("normalizer") is not None:
        return "tokenizer has a normalizer"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "pre-tokenizer is not ByteLevel(add_prefix_space=False, use_regex=True)"
    vocab, merges = model.get("vocab") or {}, model.get("merges") or []
    last = -1
    for m in merges:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        rank = vocab.get(a + b)
        if rank is None or rank <= last:
            return "merge order and token ids disagree"
        last = rank
    return None


def load_fast_bpe(tokenizer_file: str | Path) -> tuple[Any, Optional[str]]:
    """(tiktoken Encoding, None) if it is exact for this tokenizer, else (None, reason)."""
    try:
        import tiktoken
        from tokenizers import Tokenizer
    except ImportError as e:
        return None, f"tiktoken not installed ({e})"
    spec = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
    reason = why_not_fast(spec)
    if reason:
        return None, reason
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    byte_of = _byte_of_char()
    try:
        ranks = {bytes(byte_of[c] for c in tok): i for tok, i in spec["model"]["vocab"].items() if tok not in specials}
        enc = tiktoken.Encoding("project-bpe", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens=specials)
    except (KeyError, ValueError) as e:  # a vocab entry outside the byte alphabet, a duplicate rank
        return None, f"vocabulary is not byte-level ({e})"
    reference = Tokenizer.from_file(str(tokenizer_file)).encode(PROBE, add_special_tokens=False).ids
    if enc.encode(PROBE, allowed_special="all") != reference:
        return None, "probe text encodes differently"
    return enc, None
