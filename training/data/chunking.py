"""Token ids -> fixed-length training chunks, and the Ray actor that tokenizes.

Two modes, both producing chunks of exactly `context_length` tokens:

- `truncate` (the seed's): each file is cut into consecutive pieces and the short tail of
  every file is dropped. Identical to the course's `tokenizer(..., truncation=True,
  max_length=128, return_overflowing_tokens=True)` keeping pieces of length 128.
- `pack` (CodeParrot's ConstantLengthDataset): files are joined with the end-of-text
  token and the stream is cut into full chunks, so only one partial chunk is dropped
  instead of one per file. The actor carries the remainder of each batch into the next
  one; what is left in an actor when the stream ends (< context_length tokens per actor
  and split) is dropped, exactly as ConstantLengthDataset drops its last partial buffer.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa

MODES = ("truncate", "pack")


def chunk_token_ids(token_id_lists: list[list[int]], context_length: int, mode: str,
                    eos_id: int) -> list[list[int]]:
    """Chunks of exactly context_length ids from a batch of files' token ids."""
    arrays = [np.asarray(ids, dtype=np.int64) for ids in token_id_lists]
    chunks, _ = _chunk(arrays, context_length, mode, eos_id, np.empty(0, dtype=np.int64))
    return chunks.tolist()


def _chunk(arrays: Sequence[np.ndarray], ctx: int, mode: str, eos_id: int,
           carry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(chunks as an (n, ctx) array, remainder to carry into the next batch)."""
    if mode == "truncate":
        pieces = [a[: (len(a) // ctx) * ctx] for a in arrays if len(a) >= ctx]
        flat = np.concatenate(pieces) if pieces else np.empty(0, dtype=carry.dtype)
        return flat.reshape(-1, ctx), carry
    if mode == "pack":
        eos = np.array([eos_id], dtype=carry.dtype)
        parts = [carry]
        for a in arrays:
            parts.append(a)
            parts.append(eos)
        flat = np.concatenate(parts).astype(carry.dtype, copy=False)
        n = (len(flat) // ctx) * ctx
        return flat[:n].reshape(-1, ctx), flat[n:].copy()
    raise ValueError(f"data.chunking={mode!r}: must be one of {', '.join(MODES)}")


def chunks_to_table(chunks: np.ndarray, split: str) -> pa.Table:
    """Arrow-native list<int32> columns; labels share input_ids' buffers (HF shifts)."""
    n, ctx = chunks.shape
    values = pa.array(np.ascontiguousarray(chunks, dtype=np.int32).reshape(-1))
    offsets = pa.array(np.arange(0, (n + 1) * ctx, ctx, dtype=np.int32))
    ids = pa.ListArray.from_arrays(offsets, values)
    return pa.table({"input_ids": ids, "labels": ids, "split": pa.array([split] * n, pa.string())})


class TokenizeStage:
    """Ray Data actor: a batch of files (content, split) -> a batch of chunks.

    Loads the tokenizer once per actor with the `tokenizers` library alone (importing
    transformers would add seconds to every actor start), and encodes a whole batch in
    one Rust call (`encode_batch_fast`: no offsets, parallel over the batch with
    `threads` Rayon threads).
    """

    def __init__(self, tokenizer_file: str, context_length: int, mode: str, eos_id: int,
                 threads: Optional[int] = None, ledger: Any = None, keep_split: bool = True,
                 actors: int = 1) -> None:
        # Must be set before the tokenizers library builds its thread pool (first use).
        threads = threads or tokenizer_threads(actors)
        os.environ["RAYON_NUM_THREADS"] = str(max(1, threads))
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(tokenizer_file)
        self.ctx, self.mode, self.eos_id, self.ledger = context_length, mode, eos_id, ledger
        self.keep_split = keep_split  # False: only input_ids/labels (iter_torch_batches-ready)
        self.carry: dict[str, np.ndarray] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from training.data.stats import report

        texts = batch.column("content").to_pylist()
        splits = batch.column("split").to_pylist()
        encodings = self.tok.encode_batch_fast(texts) if texts else []
        by_split: dict[str, list[np.ndarray]] = {}
        for split, enc in zip(splits, encodings):
            by_split.setdefault(split, []).append(np.array(enc.ids, dtype=np.int32))
        counts: Counter = Counter()
        tables = []
        for split in sorted(by_split):
            arrays = by_split[split]
            carry = self.carry.get(split, np.empty(0, dtype=np.int32))
            chunks, self.carry[split] = _chunk(arrays, self.ctx, self.mode, self.eos_id, carry)
            extra = len(arrays) if self.mode == "pack" else 0  # the eos separators
            counts[f"files:{split}"] += len(arrays)
            counts[f"tokens:{split}"] += sum(len(a) for a in arrays) + extra
            counts[f"chunks:{split}"] += len(chunks)
            if len(chunks):
                tables.append(chunks_to_table(chunks, split))
        report(self.ledger, counts)
        if not tables:
            tables = [chunks_to_table(np.empty((0, self.ctx), dtype=np.int32), "train")]
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        return table if self.keep_split else table.drop_columns(["split"])


def usable_cores() -> int:
    """Cores this process may run on (affinity and taskset aware, unlike os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tokenizer_threads(actors: int, cores: Optional[int] = None) -> int:
    """Rayon threads per actor so that actors x threads covers the node's cores, no more
    (more threads than cores only adds switching; fewer leaves a core idle)."""
    return max(1, (cores or usable_cores()) // max(1, actors))
