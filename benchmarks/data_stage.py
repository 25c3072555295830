"""Benchmark: the data stage (dedup off / exact / exact + near) vs the course recipe's `datasets.map`.

    python benchmarks/data_stage.py [--corpus PATH | --scale 10] [--modes off,exact,near] [--chunking truncate|pack] [--repeats N] [--settle S]

Both sides start from the same corpus files on disk, use the same tokenizer (trained
once, outside the timings) and keep only full 128-token chunks:

- the course recipe (`seed_*` in the JSON): read the files, `datasets.Dataset.from_dict`,
  then the course's `tokenizer(..., truncation=True, max_length=128, return_overflowing_tokens=True,
  return_length=True)` in `Dataset.map(batched=True, num_proc=cores)` keeping length==128.
- ours, once per mode: `start_ray()` as `prepare_data` starts it (Ray start-up is timed), then its stream:
  with dedup, the plan pass (training/data/dedup.py), then read, split, drop, tokenize in
  the actor pool, writing train/valid Parquet shards. `near` is exact + near dedup at 0.85.
- floor: Ray start-up plus an identity actor-pool stage over the same number of blocks:
  what any Ray Data stage costs here before doing work.

`--scale N` builds a corpus N times the standard library's bytes from the .py files of the
installed packages (site-packages, sorted walk, symlinked into a temporary folder).

Peak memory is the largest sum of RSS over the process that runs a side and all its
descendants (ours: this process and the local Ray cluster: GCS, raylet, workers, object
store; the course recipe's: a spawned process of its own and datasets' worker processes),
sampled every 0.2 s. RSS counts shared pages (the object store) once per process that maps
them, so it overstates; it is what `top` would add up.

Prints one JSON line. In truncate mode with dedup off, the chunk counts of the two must agree.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
MODES = ("off", "exact", "near")
NEAR_THRESHOLD = 0.85


class PeakRSS:
    """Samples the RSS of this process and all its descendants; `peak` is the largest sum."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.me, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def scaled_corpus(scale: int, work: Path) -> tuple[Path, int]:
    """A folder of symlinks to installed packages' .py files, `scale` x the stdlib's bytes."""
    from training.data.sources import STDLIB_EXCLUDE, list_py_files, stdlib_root

    target = scale * sum(f.stat().st_size for f in list_py_files(stdlib_root(), STDLIB_EXCLUDE))
    root, total = work / f"corpus_x{scale}", 0
    for f in list_py_files(Path(sysconfig.get_paths()["purelib"]), {"__pycache__"}):
        if total >= target:
            break
        size = f.stat().st_size
        if size == 0:
            continue
        link = root / f.relative_to(sysconfig.get_paths()["purelib"])
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f)
        total += size
    return root, total


def seed_way(texts: list[str], tokenizer_dir: Path, context_length: int, num_proc: int) -> tuple[int, float]:
    """The course's tokenize step, timed from the texts in memory to the chunk dataset."""
    from datasets import Dataset, disable_progress_bars

    from training.data.tokenizer import load_tokenizer

    disable_progress_bars()
    tokenizer = load_tokenizer(tokenizer_dir)

    def tokenize(element: dict) -> dict:
        outputs = tokenizer(element["content"], truncation=True, max_length=context_length,
                            return_overflowing_tokens=True, return_length=True)
        input_batch = [ids for length, ids in zip(outputs["length"], outputs["input_ids"])
                       if length == context_length]
        return {"input_ids": input_batch}

    t0 = time.perf_counter()
    raw = Dataset.from_dict({"content": texts})
    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names, num_proc=num_proc)
    n = len(tokenized)
    return n, time.perf_counter() - t0


def read_texts(corpus, max_bytes: int) -> tuple[list[str], float]:
    """The course recipe's side reads the same files with the same bad-input rules (timed: ours reads too)."""
    from training.data.sources import iter_texts

    t0 = time.perf_counter()
    texts = [t for _, t in iter_texts(corpus, max_bytes)]
    return texts, time.perf_counter() - t0


def course_side(corpus_path: str | None, max_bytes: int, tokenizer_dir: Path, context_length: int,
                num_proc: int) -> dict:
    """The course recipe's whole side (read + tokenize), measured in the process it runs in."""
    from training.data.sources import resolve_corpus

    corpus = resolve_corpus(corpus_path)
    with PeakRSS() as mem:
        texts, read_s = read_texts(corpus, max_bytes)
        chunks, seconds = seed_way(texts, tokenizer_dir, context_length, num_proc)
    return {"files": len(texts), "chunks": chunks, "seconds": seconds + read_s, "peak_rss": mem.peak}


def our_way(corpus_path: str, tokenizer_dir: Path, data: dict, mode: str, workdir: Path) -> dict:
    import ray

    from training.config import JobConfig
    from training.data.pipeline import prepare_data, start_ray

    cfg = JobConfig(output=str(workdir))
    for k, v in {**data, "corpus": corpus_path, "tokenizer": str(tokenizer_dir),
                 "dedup": mode != "off", "near_dedup": NEAR_THRESHOLD if mode == "near" else None}.items():
        setattr(cfg.data, k, v)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        start_ray()
        t_ray = time.perf_counter() - t0
        stats = prepare_data(cfg).stats
        seconds = time.perf_counter() - t0
        ray.shutdown()
    plan = stats.get("dedup", {})
    return {"seconds": round(seconds, 2), "ray_start_s": round(t_ray, 2),
            "plan_seconds": plan.get("plan_seconds", 0.0), "peak_rss_mb": round(mem.peak / 2**20),
            "chunks": stats["chunks_train"] + stats["chunks_valid"], "encoder": stats["encoder"],
            "files_read": stats["files_read"], "duplicates": stats["files_skipped"].get("duplicate", 0),
            "near_duplicates": stats["files_skipped"].get("near_duplicate", 0),
            "kept_tokens_per_s": round((stats["chunks_train"] + stats["chunks_valid"]) * stats["context_length"]
                                       / seconds)}


class _Identity:
    def __call__(self, batch):
        return batch


def ray_floor(blocks: int) -> dict:
    """Ray start-up, then an identity actor-pool map_batches over `blocks` tiny blocks."""
    import ray

    from training.data.pipeline import start_ray

    t0 = time.perf_counter()
    start_ray()
    t_ray = time.perf_counter() - t0
    ds = ray.data.from_items([{"x": i} for i in range(blocks * 10)], override_num_blocks=blocks).map_batches(
        _Identity, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, batch_size=10)
    ds.materialize()
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return {"seconds": seconds, "ray_start_s": t_ray}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=None, help="corpus (default: the interpreter's standard library)")
    p.add_argument("--scale", type=int, default=None,
                   help="instead of --corpus: N x the stdlib's bytes from the installed packages' .py files")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: off, exact, near (exact + near)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train one, untimed)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--chunking", default="truncate", choices=["truncate", "pack"])
    p.add_argument("--actors", type=int, default=None, help="tokenizer actors (default: data.tokenizer_actors)")
    p.add_argument("--batch-rows", type=int, default=None, help="files per batch (default: data.batch_rows)")
    p.add_argument("--num-proc", type=int, default=None, help="the course recipe's num_proc (default: cores)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of both sides, back to back; the ratios are the median of each run's pair")
    # Seen on this project's 2-core VMs: a run started right after another had freed a few GB
    # (the course recipe's side peaks near 6 GB) ran 4-6 s slower, whichever side or mode it was.
    p.add_argument("--settle", type=float, default=20.0,
                   help="seconds of idle before each timed run, so no run starts in the last one's wake")
    p.add_argument("--no-floor", action="store_true", help="skip the empty-stage floor run")
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        print(f"error: --modes: each of {', '.join(MODES)}", file=sys.stderr)
        return 2

    from training.config import ConfigError, DataConfig
    from training.data.chunking import usable_cores
    from training.data.sources import resolve_corpus

    cores = usable_cores()
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        corpus_path, corpus_bytes = args.corpus, None
        if args.scale:
            root, corpus_bytes = scaled_corpus(args.scale, work)
            corpus_path = str(root)
        data = dict(valid_fraction=0.0, vocab_size=args.vocab_size, chunking=args.chunking,
                    tokenizer_actors=args.actors or DataConfig.tokenizer_actors, batch_rows=args.batch_rows or DataConfig.batch_rows)
        data_cfg = DataConfig(corpus=corpus_path, **data)
        try:
            corpus = resolve_corpus(corpus_path)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if corpus_bytes is None and corpus.kind == "folder":
            corpus_bytes = sum(os.path.getsize(f) for f in corpus.files)
        tok_dir = Path(args.tokenizer) if args.tokenizer else work / "tokenizer"
        if not args.tokenizer:
            from training.data.pipeline import prepare_tokenizer

            data_cfg.tokenizer_train_files = 400
            prepare_tokenizer(data_cfg, corpus, tok_dir)

        repeats = []  # (the course recipe's run, ours per mode), back to back
        for i in range(args.repeats):
            # The course recipe in a process of its own, first: datasets.map forks, and forking
            # a process that has run Ray (gRPC threads) is unsafe; and the texts it holds, and
            # the heap it grew, must not count in our side's peak memory.
            time.sleep(args.settle)
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                seed = pool.apply(course_side, (corpus_path, data_cfg.max_file_bytes, tok_dir,
                                                data_cfg.context_length, args.num_proc or cores))
            ours = {}
            for m in modes:
                time.sleep(args.settle)
                ours[m] = our_way(corpus_path, tok_dir, data, m, work / f"out_{m}_{i}")
            repeats.append((seed, ours))
        floor = None if args.no_floor else ray_floor(max(1, math.ceil(seed["files"] / data["batch_rows"])))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ctx = data_cfg.context_length
    # Each repeat's ratios pair the two sides of that repeat (the machine's spells move both).
    runs = [{m: {"ratio": r["kept_tokens_per_s"] / (seed["chunks"] * ctx / seed["seconds"]),
                 "time_ratio": seed["seconds"] / r["seconds"]} for m, r in ours.items()} for seed, ours in repeats]
    seed_s = statistics.median(seed["seconds"] for seed, _ in repeats)
    seed_chunks = repeats[0][0]["chunks"]
    # Per mode, the run of median time; peak memory is the largest of any repeat.
    ours = {m: dict(sorted((o[m] for _, o in repeats), key=lambda r: r["seconds"])[len(repeats) // 2],
                    peak_rss_mb=max(o[m]["peak_rss_mb"] for _, o in repeats)) for m in modes}
    mb = (corpus_bytes or 0) / 1e6
    result = {
        "benchmark": "data_stage", "corpus": f"site-packages x{args.scale} of stdlib" if args.scale
        else (corpus.describe() if args.corpus else "stdlib"), "files": seed["files"], "corpus_mb": round(mb, 1),
        "cores": cores, "chunking": args.chunking, "context_length": ctx, "actors": data["tokenizer_actors"],
        "batch_rows": data["batch_rows"], "repeats": args.repeats, "settle_s": args.settle,
        "seed_seconds": round(seed_s, 2), "seed_kept_tokens_per_s": round(seed_chunks * ctx / seed_s),
        "seed_chunks": seed_chunks, "seed_peak_rss_mb": round(max(seed["peak_rss"] for seed, _ in repeats) / 2**20),
        "modes": ours,
        "ratio": {m: round(statistics.median(r[m]["ratio"] for r in runs), 3) for m in modes},
        # Dedup keeps fewer chunks: the same corpus in less time is the fair speed ratio there.
        "time_ratio": {m: round(statistics.median(r[m]["time_ratio"] for r in runs), 3) for m in modes},
        "ratio_runs": {m: [round(r[m]["ratio"], 3) for r in runs] for m in modes},
        "seconds_per_mb": {m: round(r["seconds"] / mb, 4) for m, r in ours.items()} if mb else None,
        "encoder": next(iter(ours.values()))["encoder"], "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if "off" in ours and "near" in ours:
        # The share of the stage's time that dedup (plan pass + drop stage) adds.
        result["dedup_share_of_time"] = round(1 - ours["off"]["seconds"] / ours["near"]["seconds"], 3)
        if "exact" in ours:
            result["near_share_of_time"] = round(1 - ours["exact"]["seconds"] / ours["near"]["seconds"], 3)
    if floor is not None:
        result.update(ray_floor_seconds=round(floor["seconds"], 2),
                      best_ratio_possible=round(seed_s / floor["seconds"], 3))
    print(json.dumps(result))
    if args.chunking == "truncate" and "off" in ours and any(o["off"]["chunks"] != seed["chunks"] for seed, o in repeats):
        print("error: truncate-mode chunk counts differ from the course recipe's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
