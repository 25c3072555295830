"""Counting what the stream did, and the stats.json that records it.

Ray Data stages run in many processes, so their counts go to one small actor (the
ledger, 0 CPUs). Keys are flat strings: `files_read`, `skipped:<reason>`,
`files:<split>`, `tokens:<split>` (all tokens the tokenizer produced, eos separators
included in pack mode), `chunks:<split>`.

Reports are idempotent: each is filed under the key of the batch it counts (the stage's
name and a digest of the batch's rows, `batch_key`), and a second report under the same
key replaces the first. Ray Data re-runs the tasks of a lost worker on the same blocks,
so a retried batch files the same counts under the same key instead of adding them
twice. Stages get their key from the scope `keyed()` opens around them, so a stage
function only calls `report(ledger, counts)`. The ledger holds counts only; it is not on
the data path (dedup is planned before the stream: training/data/dedup.py).
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import pyarrow as pa
import ray

# [batch key, reports made in this scope so far]; None outside a keyed stage.
_SCOPE: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("stats_batch_scope", default=None)


@ray.remote(num_cpus=0)
class Ledger:
    def __init__(self) -> None:
        self.by_key: dict[str, dict[str, int]] = {}
        self.loose: Counter = Counter()  # reports made outside any keyed stage

    def add(self, key: Optional[str], counts: Mapping[str, int]) -> None:
        if key is None:
            self.loose.update(counts)
        else:
            self.by_key[key] = dict(counts)  # a retried batch replaces, never adds

    def get(self) -> dict[str, int]:
        total = Counter(self.loose)
        for counts in self.by_key.values():
            total.update(counts)
        return dict(total)

    def reports(self) -> int:
        return len(self.by_key)


def batch_key(stage: str, batch: pa.Table) -> str:
    """A digest of what a batch is: its rows' paths (the content where a row has none)
    and the content lengths, so the same block re-run gives the same key. The text is
    only read for rows without a path (lengths come from Arrow, not from Python strings)."""
    import pyarrow.compute as pc

    h = hashlib.blake2b(stage.encode(), digest_size=12)
    cols, n = batch.column_names, batch.num_rows
    paths = batch.column("path").to_pylist() if "path" in cols else [None] * n
    files = batch.column("file").to_pylist() if "file" in cols else [None] * n
    content = batch.column("content") if "content" in cols else None
    lengths = pc.binary_length(content).to_pylist() if content is not None else [None] * n
    h.update(str(n).encode())
    for i, (path, file, length) in enumerate(zip(paths, files, lengths)):
        ident = path or file
        if not ident:
            ident = (content[i].as_py() if content is not None else None) or ""
        h.update(b"\0" + ident.encode("utf-8", "surrogatepass"))
        h.update(b"\1" + str(-1 if length is None else length).encode())
    return h.hexdigest()


def keyed(fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
    """fn(batch, **kw) with every report it makes filed under this batch's key."""
    @functools.wraps(fn)
    def run(batch: pa.Table, **kwargs: Any) -> Any:
        # Only module functions here: cloudpickle ships this closure by value, and a
        # ContextVar it named directly cannot be pickled.
        token = _enter_scope(batch_key(stage, batch))
        try:
            return fn(batch, **kwargs)
        finally:
            _exit_scope(token)

    return run


def _enter_scope(key: str) -> contextvars.Token:
    return _SCOPE.set([key, 0])


def _exit_scope(token: contextvars.Token) -> None:
    _SCOPE.reset(token)


def report(ledger: Any, counts: Mapping[str, int], key: Optional[str] = None) -> None:
    """File counts under `key` (default: the current keyed scope's batch key) and wait: a
    fire-and-forget call could still be in flight when the driver reads the totals.
    A re-run batch counts the same, so empty counts need no report."""
    if ledger is None or not counts:
        return
    if key is None:
        scope = _SCOPE.get()
        if scope is not None:
            key = f"{scope[0]}#{scope[1]}"
            scope[1] += 1
    ray.get(ledger.add.remote(key, dict(counts)))


def summarize(counts: Mapping[str, int], context_length: int, chunking: str) -> dict[str, Any]:
    """The stats.json fields, from the ledger's flat counts."""
    skipped = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("skipped:")}
    stats: dict[str, Any] = {
        "files_read": counts.get("files_read", 0),
        "files_skipped": skipped,
        "files_kept": counts.get("files_read", 0) - sum(skipped.values()),
        "files_train": counts.get("files:train", 0),
        "files_valid": counts.get("files:valid", 0),
        "chunking": chunking,
        "context_length": context_length,
    }
    for split in ("train", "valid"):
        chunks = counts.get(f"chunks:{split}", 0)
        produced = counts.get(f"tokens:{split}", 0)
        stats[f"chunks_{split}"] = chunks
        stats[f"tokens_{split}"] = chunks * context_length
        stats[f"tokens_produced_{split}"] = produced
    kept = (stats["chunks_train"] + stats["chunks_valid"]) * context_length
    produced = stats["tokens_produced_train"] + stats["tokens_produced_valid"]
    # The share of the tokenizer's output that ends up in a chunk: what the mode keeps.
    stats["chunk_yield"] = round(kept / produced, 6) if produced else 0.0
    stats["tokens_dropped"] = produced - kept
    return stats


def fingerprint(parts: Mapping[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def file_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a file: size and mtime, not its bytes."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def write_stats(path: Path, stats: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a crash mid-write never leaves a half file that looks reusable


def read_stats(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def one_line(stats: Mapping[str, Any]) -> str:
    skipped = ", ".join(f"{k}={v}" for k, v in stats.get("files_skipped", {}).items()) or "none"
    return (f"data: {stats['files_read']} files read, skipped: {skipped}; "
            f"{stats['chunks_train']} train / {stats['chunks_valid']} valid chunks of "
            f"{stats['context_length']} tokens ({stats['chunking']}, yield {stats['chunk_yield']:.1%})"
            + (f" in {stats['seconds']:.1f}s" if "seconds" in stats else ""))
