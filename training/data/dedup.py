"""Exact and near-duplicate removal: planned on the cluster before the stream, applied in it.

Pass 1 (`plan`) runs the same read and filter stages as the stream, but keeps only a
small row per file: its identity (split, path, content hash) and, with near-dedup on,
its MinHash signature (training/data/minhash.py). From those rows:

- exact: rows keyed by the content hash (whitespace removed, filters.content_hash);
- near: one row per LSH band of each signature, keyed by the band's hash;

both hash-partitioned into buckets by a map-reduce of Ray tasks over the plan's blocks
(`_partition` -> `_resolve`, a hash shuffle of small rows), so each key's rows meet in
one task on some node and no process sees every key. Per key
the file that sorts first by (split, path) is kept: "train" < "valid", so a file that is
also in the validation corpus stays in training; otherwise the smallest path. The
outcome depends on the set of files only, never on block boundaries, worker count or
arrival order. Each band bucket with several distinct contents gives candidate pairs; the
driver checks them by estimated Jaccard (>= the threshold), joins the pairs that pass
with union-find and keeps one file per cluster, the smallest (split, path).

Pass 2 is the stream itself: `drop_stage` drops the planned rows, by 64-bit keys of
their identity (sorted numpy arrays, shared through the object store), and counts them
(`skipped:duplicate`, `skipped:near_duplicate`).

Rows that agree in split, path and content are one file to this plan (both are kept):
paths are unique in folders and in CodeParrot's repo_name/path; for tables without a
path the pipeline gives each row its position as its path.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa

from training.data import minhash

EXACT, BAND = "x", "b"
# A band bucket of up to this many distinct contents gives all its pairs as candidates;
# a bigger one (a file copied with small edits many times) gives a chain and a star from
# its first member, which keeps it connected at linear cost.
ALL_PAIRS_MAX = 32
MAP_TASKS_PER_BUCKET = 4

PLAN = pa.schema([("split", pa.string()), ("path", pa.string()), ("content_hash", pa.string()),
                  ("sig", pa.binary())])
KEYED = pa.schema([("bucket", pa.int64()), ("key", pa.string()), ("split", pa.string()),
                   ("path", pa.string()), ("content_hash", pa.string())])
RESOLVED = pa.schema([("kind", pa.string()), ("keep_split", pa.string()), ("keep_path", pa.string()),
                      ("keep_hash", pa.string()), ("drop_split", pa.string()), ("drop_path", pa.string()),
                      ("drop_hash", pa.string())])


def identity_key(split: str, path: str, content_hash: str) -> int:
    """A row's 63-bit identity (what pass 2 looks up)."""
    blob = f"{split}\0{path}\0{content_hash}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


def hash_key(content_hash: str) -> int:
    return int(content_hash[:16], 16) >> 1


# ---- pass 1, in Ray tasks -------------------------------------------------------------


def plan_rows(batch: pa.Table, near: bool) -> pa.Table:
    """Ray stage: (path, content, split, content_hash) rows -> PLAN rows (no content).
    Files with fewer than minhash.MIN_TOKENS tokens get no signature (never near-dups)."""
    sigs: list[Optional[bytes]] = [None] * batch.num_rows
    if near:
        sets = [minhash.tokens(t) for t in batch.column("content").to_pylist()]
        big = [i for i, s in enumerate(sets) if len(s) >= minhash.MIN_TOKENS]
        if big:
            for i, sig in zip(big, minhash.signatures([sets[i] for i in big])):
                sigs[i] = sig.astype("<u4").tobytes()
    return pa.table([batch.column("split"), batch.column("path"), batch.column("content_hash"),
                     pa.array(sigs, pa.binary())], schema=PLAN)


def keyed_rows(batch: pa.Table, buckets: int, bands: int, rows: int) -> pa.Table:
    """Ray stage: PLAN rows -> one exact row per file and one row per LSH band of each
    signature, each with the bucket (hash partition) its key belongs to."""
    out: dict[str, list] = {"bucket": [], "key": [], "split": [], "path": [], "content_hash": []}

    def add(bucket: int, key: str, split: str, path: str, h: str) -> None:
        out["bucket"].append(bucket)
        out["key"].append(key)
        out["split"].append(split)
        out["path"].append(path)
        out["content_hash"].append(h)

    cols = (batch.column(c).to_pylist() for c in ("split", "path", "content_hash", "sig"))
    for split, path, h, sig in zip(*cols):
        add(hash_key(h) % buckets, EXACT + h, split, path, h)
        if sig is not None:
            for k in minhash.band_keys(np.frombuffer(sig, dtype="<u4"), bands, rows):
                add(k % buckets, f"{BAND}{k:016x}", split, path, h)
    return pa.table(out, schema=KEYED)


def resolve_bucket(group: pa.Table) -> pa.Table:
    """Ray stage (one bucket): exact drops (keep the first of each content hash) and
    candidate pairs (distinct contents sharing a band key), both in (split, path) order."""
    order = group.sort_by([("key", "ascending"), ("split", "ascending"), ("path", "ascending"),
                           ("content_hash", "ascending")])
    out: dict[str, list] = {name: [] for name in RESOLVED.names}

    def emit(kind: str, keep: tuple, drop: tuple) -> None:
        for name, v in zip(RESOLVED.names, (kind, *keep, *drop)):
            out[name].append(v)

    keys = order.column("key").to_pylist()
    rows = list(zip(*(order.column(c).to_pylist() for c in ("split", "path", "content_hash"))))
    start = 0
    while start < len(keys):
        end = start
        while end < len(keys) and keys[end] == keys[start]:
            end += 1
        run = rows[start:end]
        if len(run) > 1:
            if keys[start][0] == EXACT:
                for prev, r in zip(run, run[1:]):
                    if r != prev:  # the same identity twice is one file (module doc)
                        emit("exact", run[0], r)
            else:
                for a, b in candidate_pairs(_first_per_hash(run)):
                    emit("pair", a, b)
        start = end
    return pa.table(out, schema=RESOLVED)


def _first_per_hash(run: list[tuple]) -> list[tuple]:
    seen: set[str] = set()
    firsts = []
    for r in run:
        if r[2] not in seen:
            seen.add(r[2])
            firsts.append(r)
    return firsts


def candidate_pairs(members: list[Any]) -> list[tuple[Any, Any]]:
    if len(members) <= ALL_PAIRS_MAX:
        return [(a, b) for i, a in enumerate(members) for b in members[i + 1:]]
    return [(members[0], b) for b in members[1:]] + list(zip(members[1:], members[2:]))


# ---- the plan (driver) ----------------------------------------------------------------


@dataclass
class Drops:
    """What pass 2 drops: sorted identity keys (exact) and content-hash keys (near)."""
    exact: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    near: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


@dataclass
class Plan:
    drops: Drops
    near_rows: list[dict]  # {"path", "split", "kept", "kept_split", "jaccard"} per near-dup dropped
    exact_rows: list[dict]  # {"path", "split", "kept", "kept_split"} per exact copy dropped
    stats: dict


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def plan(rows_ds: Any, near_threshold: Optional[float], buckets: int) -> Plan:
    """Run pass 1 on `rows_ds` (the filtered stream with split and content_hash, before
    tokenizing) and decide what pass 2 drops."""
    import ray

    t0 = time.time()
    near = near_threshold is not None
    bands, rows = minhash.lsh_bands(near_threshold) if near else (0, 0)
    blocks = rows_ds.map_batches(plan_rows, batch_format="pyarrow", fn_kwargs={"near": near}).materialize()
    refs = blocks.to_arrow_refs()
    buckets = max(2, buckets)
    # The shuffle: groups of blocks split by bucket (a few map tasks per bucket, so the
    # objects in flight are O(buckets^2), not blocks x buckets), then one task per bucket
    # over its parts.
    per = max(1, -(-len(refs) // (MAP_TASKS_PER_BUCKET * buckets)))
    parts = [_partition.options(num_returns=buckets).remote(buckets, bands, rows, *refs[i:i + per])
             for i in range(0, len(refs), per)]
    resolved = [_resolve.remote(*[p[b] for p in parts]) for b in range(buckets)]
    exact_rows, pairs = [], set()
    for table in ray.get(resolved):
        cols = {c: table.column(c).to_pylist() for c in RESOLVED.names}
        for i, kind in enumerate(cols["kind"]):
            keep = (cols["keep_split"][i], cols["keep_path"][i], cols["keep_hash"][i])
            drop = (cols["drop_split"][i], cols["drop_path"][i], cols["drop_hash"][i])
            if kind == "exact":
                exact_rows.append({"path": drop[1], "split": drop[0], "kept": keep[1], "kept_split": keep[0],
                                   "_id": identity_key(*drop)})
            else:
                pairs.add((keep[2], drop[2]))
    exact_rows.sort(key=lambda r: (r["split"], r["path"]))
    stats = {"exact_dropped": len(exact_rows), "files_planned": blocks.count(), "buckets": buckets}
    near_rows: list[dict] = []
    if near:
        near_rows, near_stats = _resolve_near(refs, pairs, near_threshold)
        stats.update(near_stats, near_threshold=near_threshold, lsh_bands=bands, lsh_rows=rows,
                     num_perm=minhash.NUM_PERM, min_tokens=minhash.MIN_TOKENS)
    drops = Drops(exact=np.array(sorted(r.pop("_id") for r in exact_rows), dtype=np.int64),
                  near=np.array(sorted({hash_key(r.pop("_hash")) for r in near_rows}), dtype=np.int64))
    stats["plan_seconds"] = round(time.time() - t0, 2)
    return Plan(drops, near_rows, exact_rows, stats)


def _remote(fn: Any) -> Any:
    import ray

    return ray.remote(num_cpus=1)(fn)


def _partition_block(buckets: int, bands: int, rows: int, *blocks: pa.Table) -> list[pa.Table]:
    keyed = keyed_rows(pa.concat_tables([b for b in blocks if b.num_rows]) if any(b.num_rows for b in blocks)
                       else PLAN.empty_table(), buckets, bands, rows)
    bucket = keyed.column("bucket").to_numpy()
    return [keyed.filter(pa.array(bucket == b)) for b in range(buckets)]


def _resolve_parts(*parts: pa.Table) -> pa.Table:
    return resolve_bucket(pa.concat_tables(parts) if parts else KEYED.empty_table())


def _pick_blocks(wanted: set[str], *blocks: pa.Table) -> pa.Table:
    picked = [b.filter(pa.array([h in wanted for h in b.column("content_hash").to_pylist()], pa.bool_()))
              for b in blocks]
    return pa.concat_tables(picked) if picked else PLAN.empty_table()


_partition = _remote(_partition_block)
_resolve = _remote(_resolve_parts)
_pick = _remote(_pick_blocks)


def _resolve_near(refs: list[Any], pairs: set[tuple[str, str]], threshold: float) -> tuple[list[dict], dict]:
    """Verify candidate pairs by estimated Jaccard, cluster them, keep one file per cluster."""
    wanted = sorted({h for p in pairs for h in p})
    nodes: dict[str, tuple[str, str, np.ndarray]] = {}  # hash -> (split, path) of its first copy, sig
    if wanted:
        import ray

        wanted_ref = ray.put(set(wanted))
        # A few blocks per task, as in the shuffle: one task per block cost more in task
        # launches than the filtering itself.
        per = max(1, -(-len(refs) // (2 * MAP_TASKS_PER_BUCKET)))
        for batch in ray.get([_pick.remote(wanted_ref, *refs[i:i + per]) for i in range(0, len(refs), per)]):
            for split, path, h, sig in zip(*(batch.column(c).to_pylist() for c in PLAN.names)):
                if h not in nodes or (split, path) < nodes[h][:2]:
                    nodes[h] = (split, path, np.frombuffer(sig, dtype="<u4"))
    uf, verified = _UnionFind(), 0
    for a, b in sorted(pairs):
        if minhash.jaccard(nodes[a][2], nodes[b][2]) >= threshold:
            uf.union(a, b)
            verified += 1
    clusters: dict[str, list[str]] = {}
    for h in uf.parent:
        clusters.setdefault(uf.find(h), []).append(h)
    dropped = []
    for members in clusters.values():
        members.sort(key=lambda h: nodes[h][:2])
        keep = nodes[members[0]]
        for h in members[1:]:
            split, path, sig = nodes[h]
            dropped.append({"path": path, "split": split, "kept": keep[1], "kept_split": keep[0],
                            "jaccard": round(minhash.jaccard(sig, keep[2]), 4), "_hash": h})
    dropped.sort(key=lambda r: (r["split"], r["path"]))
    return dropped, {"near_candidate_pairs": len(pairs), "near_pairs_verified": verified,
                     "near_clusters": sum(len(m) > 1 for m in clusters.values()), "near_dropped": len(dropped)}


# ---- pass 2, in the stream ------------------------------------------------------------

_CACHE: dict[str, Any] = {}


def _get(ref: Any) -> Any:
    """ray.get once per worker process for a broadcast object (the plan's drops)."""
    import ray

    if not isinstance(ref, ray.ObjectRef):
        return ref
    key = ref.hex()
    if key not in _CACHE:
        _CACHE.clear()  # one plan at a time per worker
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if not len(sorted_keys) or not len(keys):
        return np.zeros(len(keys), dtype=bool)
    pos = np.searchsorted(sorted_keys, keys).clip(0, len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def drop_reasons(splits: Iterable[str], paths: Iterable[str], hashes: Iterable[str], drops: Drops) -> list[Optional[str]]:
    rows = list(zip(splits, paths, hashes))
    ids = np.array([identity_key(*r) for r in rows], dtype=np.int64)
    near = np.array([hash_key(r[2]) for r in rows], dtype=np.int64)
    exact_hit, near_hit = _member(ids, drops.exact), _member(near, drops.near)
    return ["duplicate" if e else "near_duplicate" if n else None for e, n in zip(exact_hit, near_hit)]


def drop_stage(batch: pa.Table, drops: Any = None, ledger: Any = None) -> pa.Table:
    """Ray stage: drop the rows the plan decided to drop; count them by reason."""
    from collections import Counter

    from training.data.stats import report

    reasons = drop_reasons(batch.column("split").to_pylist(), batch.column("path").to_pylist(),
                           batch.column("content_hash").to_pylist(), _get(drops))
    counts = Counter(f"skipped:{r}" for r in reasons if r)
    report(ledger, counts)
    return batch.filter(pa.array([r is None for r in reasons])) if counts else batch
