"""Token ids -> fixed-length training chunks, and the Ray actor that tokenizes.

Two modes, both producing chunks of exactly `context_length` tokens:

- `truncate` (the course recipe's): each file is cut into consecutive pieces and the short tail of
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
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa

MODES = ("truncate", "pack")
ENCODE_CHARS = 1 << 20  # text per encoder call in TokenizeStage (its memory bound; see encode_arrays)


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


MANIFEST = pa.schema([("split", pa.string()), ("file", pa.string()), ("rows", pa.int64()),
                      ("digest", pa.uint64())])

# Fixed odd multipliers of the chunk digest (one per token position; grown on demand).
_DIGEST_RNG_SEED = 0x5EED
_MASK64 = (1 << 64) - 1


def _multipliers(n: int) -> np.ndarray:
    rng = np.random.default_rng(_DIGEST_RNG_SEED)
    return rng.integers(0, 1 << 63, size=(2, n), dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _splitmix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def chunk_digest(table: pa.Table) -> int:
    """An order-free digest of a table of chunks: the sum (mod 2^64) of a 64-bit hash of
    each (input_ids, labels) row. Digests of shards add up to the digest of their union,
    so the data set's fingerprint does not depend on how rows fell into shards or in
    which order they were written."""
    n = table.num_rows
    if n == 0:
        return 0

    def rows(col: pa.ChunkedArray) -> np.ndarray:
        flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return flat.astype(np.int64).astype(np.uint64).reshape(n, -1)

    ids, labels = rows(table.column("input_ids")), rows(table.column("labels"))
    mult = _multipliers(ids.shape[1])
    h = (ids * mult[0]).sum(axis=1, dtype=np.uint64)
    h ^= _splitmix((labels * mult[1]).sum(axis=1, dtype=np.uint64))
    return int(_splitmix(h).sum(dtype=np.uint64))


def add_digests(digests: Sequence[int]) -> int:
    return sum(digests) & _MASK64


def chunks_to_table(chunks: np.ndarray, split: str, labels: Optional[np.ndarray] = None) -> pa.Table:
    """Arrow-native list<int32> columns; labels share input_ids' buffers (HF shifts)
    unless given (FIM chunks: -100 on the padding)."""
    n, ctx = chunks.shape
    offsets = pa.array(np.arange(0, (n + 1) * ctx, ctx, dtype=np.int32))

    def column(a: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(a, dtype=np.int32).reshape(-1)))

    ids = column(chunks)
    return pa.table({"input_ids": ids, "labels": ids if labels is None else column(labels),
                     "split": pa.array([split] * n, pa.string())})


class TokenizeStage:
    """Ray Data actor: a batch of files (content, split) -> a batch of chunks.

    Loads the tokenizer once per actor without transformers (importing it would add
    seconds to every actor start) and encodes a whole batch in one Rust call spread over
    `threads` threads: with tiktoken where it is exact for this tokenizer (fast_bpe.py,
    faster), else with `tokenizers`' `encode_batch_fast` (no offsets).
    """

    def __init__(self, tokenizer_file: str, context_length: int, mode: str, eos_id: int,
                 threads: Optional[int] = None, ledger: Any = None, keep_split: bool = True,
                 actors: int = 1, write_dir: Optional[str] = None, fim: Optional[dict] = None) -> None:
        # Must be set before the tokenizers library builds its thread pool (first use).
        threads = threads or tokenizer_threads(actors)
        os.environ["RAYON_NUM_THREADS"] = str(max(1, threads))
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
        from tokenizers import Tokenizer

        from training.data.fast_bpe import load_fast_bpe

        self.threads = max(1, threads)
        self.fast, self.why_slow = load_fast_bpe(tokenizer_file)
        self.tok = None if self.fast is not None else Tokenizer.from_file(tokenizer_file)
        self.ctx, self.mode, self.eos_id, self.ledger = context_length, mode, eos_id, ledger
        self.keep_split = keep_split  # False: only input_ids/labels (iter_torch_batches-ready)
        self.carry: dict[str, np.ndarray] = {}
        # write_dir set: the actor writes its chunks as Parquet shards itself and returns
        # only a manifest row per shard. A separate Ray Data write stage would start its
        # own worker processes, which cost more than the tokenizing on 2 cores.
        self.write_dir = write_dir
        # fim: {"rate", "spm_rate", "seed"}; applied to the training split only, so the
        # validation loss stays the left-to-right loss whatever the FIM rate.
        self.fim = fim if fim and fim.get("rate", 0) > 0 else None
        if self.fim is not None:
            from training.data.fim import codec_from_file

            # tokenizers encodes a batch in one Rust call; tiktoken's batch call goes through a
            # Python thread pool that costs more than its per-text calls on these short texts.
            self.codec, self.fim_ids = codec_from_file(tokenizer_file, self.encode_one,
                                                       self.encode if self.fast is None else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from training.data.stats import batch_key, report

        key = batch_key("tokenize", batch)
        texts = batch.column("content").to_pylist()
        splits = batch.column("split").to_pylist()
        by_split: dict[str, list[np.ndarray]] = {}
        for split, ids in zip(splits, self.encode_arrays(texts)):
            by_split.setdefault(split, []).append(ids)
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
                tables.append(self.to_table(chunks, split))
        report(self.ledger, counts, key=key)
        if self.write_dir is not None:
            return self._write(tables, key)
        if not tables:
            tables = [chunks_to_table(np.empty((0, self.ctx), dtype=np.int32), "train")]
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        return table if self.keep_split else table.drop_columns(["split"])

    def to_table(self, chunks: np.ndarray, split: str) -> pa.Table:
        if self.fim is None or split != "train":
            return chunks_to_table(chunks, split)
        from training.data.fim import fim_chunks

        inputs, labels = fim_chunks(chunks, self.fim["seed"], self.codec, self.fim_ids,
                                    self.fim["rate"], self.fim["spm_rate"])
        return chunks_to_table(inputs, split, labels)

    def _write(self, tables: list[pa.Table], key: str) -> pa.Table:
        """Each split's chunks -> WRITE_DIR/<split>/<batch key>.parquet; returns the manifest.

        The name is the batch's key, so a batch re-run after a lost worker writes the same
        file again instead of a second one, and the file appears whole or not at all
        (written under a temporary name, then renamed). The driver keeps only shards that
        appear in the final manifest (pipeline.write_splits)."""
        import pyarrow.parquet as pq

        manifest: dict[str, list] = {"split": [], "file": [], "rows": [], "digest": []}
        for table in tables:
            split = table.column("split")[0].as_py()
            folder = os.path.join(self.write_dir, split)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{key}.parquet")
            chunks = table.drop_columns(["split"])
            tmp = f"{path}.{os.getpid()}.tmp"
            pq.write_table(chunks, tmp)
            os.replace(tmp, path)
            manifest["split"].append(split)
            manifest["file"].append(path)
            manifest["rows"].append(table.num_rows)
            manifest["digest"].append(chunk_digest(chunks))
        return pa.table(manifest, schema=MANIFEST)

    def encode_arrays(self, texts: list[str]) -> Iterator[np.ndarray]:
        """Each text's ids as an int32 array, encoded in slices of about ENCODE_CHARS of text.

        The encoders return Python lists, about 36 bytes per token (an int object and its
        pointer) against 4 in the array: a batch encoded whole held about ten times its text
        at once, so an actor's memory grew with the largest batch it met."""
        start = 0
        while start < len(texts):
            end, size = start + 1, len(texts[start])
            while end < len(texts) and size + len(texts[end]) <= ENCODE_CHARS:
                size += len(texts[end])
                end += 1
            for ids in self.encode(texts[start:end]):
                yield np.array(ids, dtype=np.int32)
            start = end

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.fast is not None:
            # allowed_special: a literal "<|endoftext|>" in a file is the special token, as in HF.
            return self.fast.encode_batch(texts, num_threads=self.threads, allowed_special="all")
        return [e.ids for e in self.tok.encode_batch_fast(texts)]

    def encode_one(self, text: str) -> list[int]:
        if self.fast is not None:
            return self.fast.encode(text, allowed_special="all")
        return self.tok.encode(text, add_special_tokens=False).ids


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
