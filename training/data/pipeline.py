"""The data stage: `prepare_data(cfg)` and `chunk_dataset(...)`.

    corpus -> read (+ bad-input checks, [licences]) -> split -> [clean recipe | quality] -> [keywords]
           -> [dedup: drop what the plan decided] -> tokenize + chunk (actor pool)
           -> Parquet shards under OUTPUT/data/{train,valid}

With dedup on, a first pass over the same read and filter stages plans which files go
(training/data/dedup.py: exact copies and, with near_dedup, MinHash near copies, both
hash-partitioned over the cluster) before the stream above runs.

Everything that can fail on bad input (the corpus, the valid corpus, the tokenizer
folder) is checked on the driver before Ray starts. The per-file stages are plain
task-pool `map_batches` with the same CPU request as the tokenizer actors, so Ray Data
fuses them into the actors: a file is read, filtered and tokenized in one process and
only the chunks travel through the object store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa

from training.config import ConfigError, DataConfig, JobConfig
from training.data import dedup, sources, split as splitting
from training.data.chunking import TokenizeStage
from training.data.filters import clean_stage, content_hash, keep_filters, keyword_stage, quality_stage
from training.data.licenses import check_license_counts, check_licenses, may_have_licenses
from training.data.stats import Ledger, fingerprint, keyed, one_line, read_stats, summarize, write_stats
from training.data.writing import (LostWorkerError, check_plan, check_written, lost_worker_guard, write_jsonl,
                                   write_splits)
from training.layout import RunLayout

# Config fields that change the chunks. tokenizer_actors and batch_rows only change speed
# (and, in pack mode, where chunk boundaries fall), so a rerun with other values reuses.
_SPEED_ONLY = ("tokenizer_actors", "batch_rows")


@dataclass
class PreparedData:
    root: Path
    tokenizer_dir: Path
    train_dir: Path
    valid_dir: Path
    stats_path: Path
    stats: dict = field(default_factory=dict)
    reused: bool = False


def layout(output: str | Path) -> PreparedData:
    run = RunLayout(output)
    return PreparedData(root=run.root, tokenizer_dir=run.tokenizer, train_dir=run.train_split,
                        valid_dir=run.valid_split, stats_path=run.stats)


# ---- the stage ------------------------------------------------------------------------


def prepare_data(cfg: JobConfig) -> PreparedData:
    """Tokenizer + train/valid chunks under cfg.output, or reuse them if already there."""
    d = cfg.data
    d.validate()  # also called from Python, where no CLI has validated it
    out = layout(cfg.output)
    corpus = sources.resolve_corpus(d.corpus, "data.corpus", d.max_files)
    valid = sources.resolve_corpus(d.valid_corpus, "data.valid_corpus", d.max_files) if d.valid_corpus else None
    if d.tokenizer is not None and not (Path(d.tokenizer) / "tokenizer.json").is_file() \
            and not (Path(d.tokenizer) / "tokenizer_config.json").is_file():
        raise ConfigError(f"data.tokenizer={d.tokenizer!r}: no tokenizer.json or tokenizer_config.json in that folder")
    check_licenses(d.licenses, corpus, valid)
    fp = data_fingerprint(d, corpus, valid)

    old = read_stats(out.stats_path)
    if old and old.get("fingerprint") == fp and out.train_dir.is_dir() \
            and (out.tokenizer_dir / "tokenizer.json").is_file():
        out.stats, out.reused = old, True
        print(f"data: reusing {out.stats_path} (same data config and corpus)", flush=True)
        return out

    t0 = time.time()
    run = RunLayout(out.root)
    for stale in (out.train_dir, out.valid_dir, staging_dir(out), out.stats_path, run.duplicates, run.near_duplicates):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tok_seconds = prepare_tokenizer(d, corpus, out.tokenizer_dir)

    start_ray()
    inputs = [(corpus, None if valid is None else splitting.TRAIN)] + ([(valid, splitting.VALID)] if valid else [])
    ledger = Ledger.remote()
    with lost_worker_guard():
        plan = plan_dedup(inputs, d, out.tokenizer_dir)
        ds = build_chunks(inputs, out.tokenizer_dir, d, ledger=ledger, write_dir=staging_dir(out), fim=True,
                          drops=None if plan is None else ray_put(plan.drops))
        rows, digests = write_splits(ds, out)
        counts = ray_get_counts(ledger)
    stats = summarize(counts, d.context_length, d.chunking)
    check_license_counts(d.licenses, stats)
    check_written(stats, rows)
    stats.update(chunks_fingerprint={k: f"{v:016x}" for k, v in digests.items()})
    if plan is not None:
        stats["dedup"] = plan.stats
        check_plan(stats, plan)
        write_jsonl(RunLayout(out.root).duplicates, plan.exact_rows)
        if d.near_dedup is not None:
            write_jsonl(RunLayout(out.root).near_duplicates, plan.near_rows)
    stats.update(fingerprint=fp, corpus=corpus.describe(), valid_corpus=valid.describe() if valid else None,
                 tokenizer=d.tokenizer or "trained", vocab_size=_vocab_size(out.tokenizer_dir),
                 filters={"dedup": d.dedup, "near_dedup": d.near_dedup, "quality_filter": d.quality_filter,
                          "keywords": list(d.keywords), "clean": d.clean, "clean_seed": d.clean_seed,
                          "licenses": list(d.licenses)},
                 tokenizer_seconds=round(tok_seconds, 2), seconds=round(time.time() - t0, 2),
                 encoder=encoder_of(out.tokenizer_dir))
    if stats["chunks_valid"] == 0 and stats["chunks_train"] > 0:
        print(f"data: warning: the validation split has no chunk ({out.valid_dir} is empty); "
              "raise --valid-fraction or give --valid-corpus", flush=True)
    if stats["chunks_train"] == 0:
        raise ConfigError(f"data.corpus={d.corpus!r}: no full {d.context_length}-token chunk in the training split "
                          f"({stats['files_read']} files read, skipped: {stats['files_skipped']}); "
                          f"use a bigger corpus, --chunking pack or a smaller --context-length")
    write_stats(out.stats_path, stats)
    out.stats = stats
    print(one_line(stats), flush=True)
    return out


def chunk_dataset(corpus: Optional[str], tokenizer_dir: str | Path, data_cfg: DataConfig,
                  split: str = "all") -> Any:
    """The same reading, filtering and chunking as training, as a lazy Ray Dataset of
    input_ids/labels (for perplexity on a held-out corpus). Joins or starts Ray if needed."""
    if split not in ("train", "valid", "all"):
        raise ConfigError(f"split={split!r}: must be train, valid or all")
    data_cfg.validate()
    c = sources.resolve_corpus(corpus, "data.corpus", data_cfg.max_files)
    if data_cfg.licenses and not may_have_licenses(c):  # scoring another corpus than the run's
        print(f"data: {c.describe()} has no licence column; reading it without data.licenses", flush=True)
        data_cfg = dataclasses.replace(data_cfg, licenses=[])
    start_ray()
    plan = plan_dedup([(c, None)], data_cfg, Path(tokenizer_dir))  # runs pass 1 now: the stream is lazy, the plan is not
    return build_chunks([(c, None)], Path(tokenizer_dir), data_cfg, keep_split=False,
                        only_split=None if split == "all" else split,
                        drops=None if plan is None else ray_put(plan.drops))


def start_ray() -> None:
    """Join the cluster Ray is on (the job's, RAY_ADDRESS), else start a local one for the
    data stage alone, without the dashboard: only Ray Train needs its State API, and on a
    2-core machine its processes took CPU from the stage (benchmarks/RESULTS.md)."""
    from training.ray_utils import init_ray

    init_ray(include_dashboard=False)


def data_fingerprint(d: DataConfig, corpus: sources.Corpus, valid: Optional[sources.Corpus]) -> str:
    parts = {k: v for k, v in vars(d).items() if k not in _SPEED_ONLY}
    parts["corpus"] = sources.corpus_identity(corpus)
    parts["valid_corpus"] = sources.corpus_identity(valid) if valid else None
    if d.tokenizer:
        tj = Path(d.tokenizer) / "tokenizer.json"
        parts["tokenizer_file"] = hashlib.sha256(tj.read_bytes()).hexdigest() if tj.is_file() else d.tokenizer
    return fingerprint(parts)


# ---- tokenizer ------------------------------------------------------------------------


def prepare_tokenizer(d: DataConfig, corpus: sources.Corpus, tokenizer_dir: Path) -> float:
    """Load `data.tokenizer` or train one on the training split; save it under
    tokenizer_dir either way, so the run folder is self-contained. Returns seconds."""
    from training.data.tokenizer import FIM_TOKENS, load_tokenizer, save_tokenizer, train_tokenizer

    t0 = time.time()
    if d.tokenizer is not None:
        try:
            tok = load_tokenizer(d.tokenizer)
        except Exception as e:
            raise ConfigError(f"data.tokenizer={d.tokenizer!r}: cannot load: {e}") from None
        if not tok.is_fast:
            raise ConfigError(f"data.tokenizer={d.tokenizer!r}: needs a fast (tokenizer.json) tokenizer")
        missing = [t for t in FIM_TOKENS if t not in tok.get_vocab()]
        if d.fim_rate > 0 and missing:
            raise ConfigError(f"data.tokenizer={d.tokenizer!r}: has no {', '.join(missing)} token, which "
                              f"data.fim_rate={d.fim_rate} needs; use --fim-rate 0 or a tokenizer with them")
    else:
        texts = tokenizer_sample(d, corpus)
        if not texts:
            raise ConfigError(f"data.corpus={d.corpus!r}: no usable training file to train the tokenizer on")
        tok = train_tokenizer(texts, vocab_size=d.vocab_size, context_length=d.context_length)
    if Path(d.tokenizer or "").resolve() != tokenizer_dir.resolve():
        save_tokenizer(tok, tokenizer_dir)
    return time.time() - t0


def tokenizer_sample(d: DataConfig, corpus: sources.Corpus) -> list[str]:
    """Up to tokenizer_train_files training-split files that pass the filters.

    Folder files are visited in the order of their split hash, a fixed pseudo-random
    order, so the sample is spread over the whole tree rather than its first letters."""
    if corpus.kind == "folder":
        root = Path(corpus.root)
        files = sorted(corpus.files, key=lambda f: splitting.key_fraction(Path(f).relative_to(root).as_posix()))
        corpus = sources.Corpus("folder", corpus.location, corpus.field, tuple(files), corpus.root)
    texts, seen = [], set()
    for path, text in sources.iter_texts(corpus, d.max_file_bytes, licenses=d.licenses):
        if keep_filters(text, d.quality_filter, d.keywords, d.clean, d.clean_seed):
            continue
        key = content_hash(text) if d.dedup else path
        if d.valid_corpus is None and splitting.split_of(key, d.valid_fraction) != splitting.TRAIN:
            continue
        if d.dedup:
            if key in seen:
                continue
            seen.add(key)
        texts.append(text)
        if len(texts) >= d.tokenizer_train_files:
            break
    return texts


def eos_id_of(tokenizer_dir: Path) -> int:
    """The eos id without importing transformers: tokenizer_config.json names the token,
    tokenizer.json maps it to an id."""
    from tokenizers import Tokenizer

    cfg_file = tokenizer_dir / "tokenizer_config.json"
    eos: Any = json.loads(cfg_file.read_text()).get("eos_token") if cfg_file.is_file() else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos_id = tok.token_to_id(eos or "<|endoftext|>")
    if eos_id is None:
        raise ConfigError(f"data.tokenizer={str(tokenizer_dir)!r}: has no end-of-text token ({eos!r})")
    return eos_id


def encoder_of(tokenizer_dir: Path) -> str:
    """Which library the actors encode with (fast_bpe.py); says why when it is the slow one."""
    from training.data.fast_bpe import load_fast_bpe

    enc, why = load_fast_bpe(tokenizer_dir / "tokenizer.json")
    if enc is not None:
        return "tiktoken"
    print(f"data: encoding with `tokenizers`, not tiktoken: {why}", flush=True)
    return "tokenizers"


def _vocab_size(tokenizer_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()


# ---- the Ray Data graph ---------------------------------------------------------------


def cpu_plan(actors: int) -> float:
    """CPUs per tokenizer actor on the cluster Ray is joined to.

    Logical CPUs are reservations: if the actors took them all, Ray Data would never
    schedule a read task and the stream would stall (2 x 1-CPU actors on num_cpus=2 hung
    forever; docs/training.md, "CPU budgeting"). So the actors together take at most what leaves one
    task's worth free."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return min(1.0, total / (actors + 1))


def build_chunks(inputs: list[tuple[sources.Corpus, Optional[str]]], tokenizer_dir: Path, d: DataConfig,
                 ledger: Any = None, keep_split: bool = True, only_split: Optional[str] = None,
                 write_dir: Optional[Path] = None, fim: bool = False, drops: Any = None) -> Any:
    """The lazy Dataset of chunks. inputs: (corpus, forced split or None for the hash split).
    fim: rewrite training-split chunks for fill-in-the-middle (data.fim_rate); evaluation
    streams (chunk_dataset) stay left to right. drops: the dedup plan's `Drops` (an
    ObjectRef), required when d.dedup is on.
    With write_dir, the tokenizer actors write the chunks there as Parquet shards and the
    Dataset holds only their manifest (see write_splits)."""
    import ray

    if d.dedup and drops is None:
        raise ValueError("data.dedup is on: build_chunks needs the plan's drops (plan_dedup)")
    blocks = folder_blocks(inputs, d.batch_rows)
    if blocks is not None and blocks < d.tokenizer_actors:  # an actor with no block only costs its start
        d = dataclasses.replace(d, tokenizer_actors=blocks)
    actors = d.tokenizer_actors
    actor_cpus = cpu_plan(actors)
    stage = {"batch_format": "pyarrow", "num_cpus": actor_cpus}  # same args => fused into the actors
    ds = file_rows(inputs, d, ledger, only_split, stage, tokenizer_dir)
    if d.dedup:
        ds = ds.map_batches(keyed(dedup.drop_stage, "dedup"), batch_size=d.batch_rows,
                            fn_kwargs={"drops": drops, "ledger": ledger}, **stage)
    return ds.map_batches(
        TokenizeStage, batch_size=d.batch_rows, batch_format="pyarrow", num_cpus=actor_cpus,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"tokenizer_file": str(tokenizer_dir / "tokenizer.json"),
                               "context_length": d.context_length, "mode": d.chunking,
                               "eos_id": eos_id_of(tokenizer_dir), "actors": actors,
                               "ledger": ledger, "keep_split": keep_split,
                               "write_dir": None if write_dir is None else str(write_dir),
                               "fim": {"rate": d.fim_rate, "spm_rate": d.fim_spm_rate, "seed": d.fim_seed}
                               if fim else None})


def folder_blocks(inputs: list[tuple[sources.Corpus, Optional[str]]], batch_rows: int) -> Optional[int]:
    """How many blocks the stream has (one per batch of files, see _rows), where it is known
    before reading: for folder corpora; None for tables and hub data sets."""
    if any(c.kind != "folder" for c, _ in inputs):
        return None
    return sum(max(1, math.ceil(len(c.files) / batch_rows)) for c, _ in inputs)


def file_rows(inputs: list[tuple[sources.Corpus, Optional[str]]], d: DataConfig, ledger: Any,
              only_split: Optional[str], stage: dict, tokenizer_dir: Path) -> Any:
    """The checked, split and filtered (path, content, split[, content_hash]) rows of all
    inputs: what both the dedup plan and the stream read. Every stage files its counts
    under its batch's key (stats.keyed), so a re-run batch is not counted twice."""
    parts = [_rows(c, d, ledger, stage).map_batches(
        assign_split, batch_size=d.batch_rows, fn_kwargs={"valid_fraction": d.valid_fraction, "forced": forced,
                                                          "by_content": d.dedup, "only": only_split}, **stage)
             for c, forced in inputs]
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    if d.clean:  # its char/token rule uses the run's tokenizer, on the tokenizer actors' threads
        ds = ds.map_batches(keyed(clean_stage, "clean"), batch_size=d.batch_rows, fn_kwargs={
            "recipe": d.clean, "seed": d.clean_seed, "tokenizer_file": str(Path(tokenizer_dir) / "tokenizer.json"),
            "actors": d.tokenizer_actors, "ledger": ledger}, **stage)
    elif d.quality_filter:
        ds = ds.map_batches(keyed(quality_stage, "quality"), batch_size=d.batch_rows,
                            fn_kwargs={"ledger": ledger}, **stage)
    if d.keywords:
        ds = ds.map_batches(keyed(keyword_stage, "keywords"), batch_size=d.batch_rows,
                            fn_kwargs={"keywords": list(d.keywords), "ledger": ledger}, **stage)
    return ds


def plan_dedup(inputs: list[tuple[sources.Corpus, Optional[str]]], d: DataConfig,
               tokenizer_dir: Path) -> Optional[dedup.Plan]:
    """Pass 1 when dedup is on (nothing counted: the stream counts), else None."""
    if not d.dedup:
        return None
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    rows = file_rows(inputs, d, None, None, {"batch_format": "pyarrow"}, tokenizer_dir)
    plan = dedup.plan(rows, d.near_dedup, buckets=max(2, int(cpus)))
    s = plan.stats
    print(f"data: dedup plan: {s['exact_dropped']} exact copies"
          + (f", {s['near_dropped']} near copies in {s['near_clusters']} clusters"
             f" (Jaccard >= {d.near_dedup})" if d.near_dedup is not None else "")
          + f" of {s['files_planned']} files, {s['plan_seconds']:.1f}s", flush=True)
    return plan


def ray_put(obj: Any) -> Any:
    import ray

    return ray.put(obj)


def _rows(c: sources.Corpus, d: DataConfig, ledger: Any, stage: dict) -> Any:
    """A corpus as a Dataset of checked (path, content) rows."""
    import ray

    stage = {**stage, "batch_size": d.batch_rows}
    if c.kind == "folder":
        root = Path(c.root)
        items = [{"file": f, "path": Path(f).relative_to(root).as_posix()} for f in c.files]
        # One block per batch: small files would otherwise become one read task each.
        blocks = folder_blocks([(c, None)], d.batch_rows)
        return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            keyed(sources.read_py_batch, "read"),
            fn_kwargs={"max_bytes": d.max_file_bytes, "ledger": ledger}, **stage)
    # The raw reads ask for the actors' CPU share too: what the actors leave is one such share
    # (cpu_plan), so a default 1-CPU read task never fit beside 2 actors on 2 CPUs and stalled.
    read = {"num_cpus": stage["num_cpus"]} if "num_cpus" in stage else {}
    if c.kind == "table":
        items = [{"file": f, "row_group": rg} for f, rg in c.units]
        raw = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_table_units, batch_size=1, fn_kwargs={"batch_rows": d.batch_rows, "positions": d.dedup},
            batch_format="pyarrow", **read)
    else:
        raw = ray.data.from_items([{"shard": i} for i in range(c.shards)], override_num_blocks=c.shards).map_batches(
            sources.read_hub_shards, batch_size=1, batch_format="pyarrow", **read,
            fn_kwargs={"location": c.location, "field_name": c.field, "batch_rows": d.batch_rows})
    if d.max_files and c.kind != "folder":
        raw = raw.limit(d.max_files)
    return raw.map_batches(keyed(sources.table_stage, "table"),
                           fn_kwargs={"max_bytes": d.max_file_bytes, "ledger": ledger, "licenses": list(d.licenses)},
                           **stage)


def read_table_units(batch: pa.Table, batch_rows: int, positions: bool) -> Any:
    """sources.read_table_units, but with `positions` a row with neither repo_name nor
    path gets its place (file#row_group:row) as its path: the identity dedup keeps or drops
    (dedup.py), which the content alone cannot give two identical rows."""
    if not positions:
        yield from sources.read_table_units(batch, batch_rows)
        return
    for file, rg in zip(batch.column("file").to_pylist(), batch.column("row_group").to_pylist()):
        offset = 0
        for raw in sources.iter_raw(file, rg, batch_rows):
            repos, paths = raw.column("repo_name").to_pylist(), raw.column("path").to_pylist()
            filled = [p if (p or r) else f"{file}#{rg}:{offset + i}" for i, (r, p) in enumerate(zip(repos, paths))]
            offset += raw.num_rows
            yield raw.set_column(raw.schema.get_field_index("path"), "path", pa.array(filled, pa.string()))


def assign_split(batch: pa.Table, valid_fraction: float, forced: Optional[str], by_content: bool,
                 only: Optional[str]) -> pa.Table:
    """Add `split` (and `content_hash` when dedup is on); drop rows outside `only`."""
    texts = batch.column("content").to_pylist()
    hashes = [content_hash(t) for t in texts] if by_content else None
    keys = hashes if by_content else batch.column("path").to_pylist()
    splits = [forced or splitting.split_of(k, valid_fraction) for k in keys]
    out = batch.append_column("split", pa.array(splits, pa.string()))
    if hashes is not None:
        out = out.append_column("content_hash", pa.array(hashes, pa.string()))
    if only is not None:
        out = out.filter(pa.array([s == only for s in splits]))
    return out


# ---- writing --------------------------------------------------------------------------


def staging_dir(out: PreparedData) -> Path:
    return RunLayout(out.root).staging


def ray_get_counts(ledger: Any) -> dict[str, int]:
    import ray

    return ray.get(ledger.get.remote())


__all__ = ["LostWorkerError", "build_chunks", "chunk_dataset", "layout", "prepare_data", "staging_dir", "start_ray",
           "write_splits"]
