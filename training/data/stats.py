"""Counting what the stream did, and the stats.json that records it.

Ray Data stages run in many processes, so their counts go to one small actor (the
ledger, 0 CPUs) that also holds the dedup set: one extra process instead of two. Keys
are flat strings: `files_read`, `skipped:<reason>`, `files:<split>`, `tokens:<split>`
(all tokens the tokenizer produced, eos separators included in pack mode),
`chunks:<split>`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional

import ray


@ray.remote(num_cpus=0)
class Ledger:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.seen: set[str] = set()

    def add(self, counts: Mapping[str, int]) -> None:
        self.counts.update(counts)

    def claim(self, hashes: list[str]) -> list[bool]:
        """True for each hash not seen before (then it is seen). First claim wins."""
        out = []
        for h in hashes:
            out.append(h not in self.seen)
            self.seen.add(h)
        return out

    def get(self) -> dict[str, int]:
        return dict(self.counts)


def report(ledger: Any, counts: Mapping[str, int]) -> None:
    """Send counts and wait: a fire-and-forget call could still be in flight when the
    driver reads the totals."""
    if ledger is not None and counts:
        ray.get(ledger.add.remote(dict(counts)))


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
