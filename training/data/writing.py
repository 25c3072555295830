"""What the data stage leaves on disk, and how it ends when Ray loses a worker it cannot replace.

`write_splits` runs the stream and moves exactly the shards of its manifest into train/ and
valid/; `check_written` / `check_plan` compare the counts with the manifest and the dedup
plan; `lost_worker_guard` turns a lost node, worker, actor or object into one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional

from training.data import split as splitting
from training.data.chunking import add_digests
from training.layout import RunLayout

def write_splits(ds: Any, out: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Run the stream (its tokenizer actors write shards under the staging folder and
    return a manifest), keep exactly the shards the manifest names, move them to train/
    and valid/. Returns the chunk rows and the chunk digest (chunking.chunk_digest) per
    split. `out`: a pipeline.PreparedData. A shard not in the manifest was left by a failed task whose batch went
    elsewhere: it is deleted, so nothing is counted twice. A name listed twice is two
    batches with the very same rows (a file given twice, no dedup): both are kept."""
    staging = RunLayout(out.root).staging
    listed: Counter = Counter()
    rows = {splitting.TRAIN: 0, splitting.VALID: 0}
    digests = {splitting.TRAIN: [], splitting.VALID: []}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        cols = (batch.column(c).to_pylist() for c in ("split", "file", "rows", "digest"))
        for split, file, n, digest in zip(*cols):
            listed[os.path.abspath(file)] += 1
            rows[split] += n
            digests[split].append(digest)
    for name, dest in ((splitting.TRAIN, out.train_dir), (splitting.VALID, out.valid_dir)):
        dest.mkdir(parents=True, exist_ok=True)  # an empty split is an empty folder
        src = staging / name
        for f in sorted(src.glob("*.parquet")) if src.is_dir() else []:
            times = listed.get(os.path.abspath(f), 0)
            for copy in range(1, times):
                shutil.copyfile(f, dest / f"{f.stem}-{copy}.parquet")
            if times:
                os.replace(f, dest / f.name)
            else:
                print(f"data: removing {f.name}, a shard left by a retried task", flush=True)
    shutil.rmtree(staging, ignore_errors=True)
    return rows, {k: add_digests(v) for k, v in digests.items()}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def lost_worker_guard() -> Iterator[None]:
    """An error that is, or was caused by, a lost node, worker, actor (the counting ledger)
    or object ends the stage with one line that names it, before anything is moved into
    train/ or stats.json is written. A lost worker process whose tasks Ray Data re-runs
    does not get here: its batches are keyed and re-run (docs/data.md, "A lost worker")."""
    try:
        yield
    except Exception as e:
        lost = lost_cause(e)
        if lost is None:
            raise
        text = " ".join(str(lost).split())
        node = re.search(r"(node[ _]?id[:= ]+[0-9a-f]+|ip(?: address)?[:= ]+[\d.]+)", text, re.I)
        raise LostWorkerError(f"data: the stage lost a Ray worker ({type(lost).__name__}"
                              f"{', ' + node.group(0) if node else ''}): no data was written; "
                              "rerun the stage") from e


def lost_cause(e: BaseException) -> Optional[BaseException]:
    """The lost-node/worker/actor/object error in e's chain of causes, if any."""
    import ray.exceptions as rex

    kinds = tuple(getattr(rex, n) for n in ("RayActorError", "NodeDiedError", "ObjectLostError",
                                            "WorkerCrashedError", "OwnerDiedError") if hasattr(rex, n))
    seen: set[int] = set()
    todo: list[Optional[BaseException]] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, kinds):
            return x
        todo += [x.__cause__, x.__context__, getattr(x, "cause", None)]
    return None


class LostWorkerError(RuntimeError):
    pass


def check_written(stats: dict, rows: dict[str, int]) -> None:
    """Chunk counts come from the manifest of the shards kept (the truth the trainer
    reads). The ledger should agree; if a retried task was counted twice it will not,
    and stats say so."""
    for split, n in rows.items():
        if n != stats[f"chunks_{split}"]:
            stats.setdefault("warnings", []).append(
                f"ledger counted {stats[f'chunks_{split}']} {split} chunks, shards hold {n} "
                "(a retried task is counted twice; file counts may be high too)")
            print(f"data: warning: {stats['warnings'][-1]}", flush=True)
            stats[f"chunks_{split}"] = n
            stats[f"tokens_{split}"] = n * stats["context_length"]


def check_plan(stats: dict, plan: Any) -> None:
    """The stream's dedup counts should be what the plan decided."""
    skipped = stats["files_skipped"]
    for reason, planned in (("duplicate", plan.stats["exact_dropped"]),
                            ("near_duplicate", plan.stats.get("near_dropped", 0))):
        if skipped.get(reason, 0) != planned:
            stats.setdefault("warnings", []).append(
                f"dedup planned {planned} {reason} drops, the stream dropped {skipped.get(reason, 0)}")
            print(f"data: warning: {stats['warnings'][-1]}", flush=True)
