"""Dedup and a lost worker, end to end on real Ray.

One planted corpus (tests/support/corpus.py: exact copies in other folders and blocks, a
whitespace-only variant, near copies above Jaccard 0.85, two copies just under it):

- prepared with exact + near dedup on a 1-CPU and on a 4-CPU cluster: every planted twin
  dropped and listed, none of the under-threshold files, and the same counts and chunks;
- prepared by `training/run.py --prepare-only` against a real head whose tokenizer actor
  (a Ray worker process) is killed with SIGKILL while the stream writes shards: the run
  must end with the same stats.json counts and the same chunks as the undisturbed run.
  Shown to fail without the fix: the same kill (exact dedup, same corpus and flags) on the
  parent of the commit that added this test, where dedup was one actor's set of claimed
  hashes and reports added up, ended with exit 0 and files_read 50 instead of 48,
  `duplicate` 5 instead of 3 (the re-run batch's files were duplicates of their own first
  claim) and 2,434 train chunks instead of 2,505: a silently smaller data set, with only a
  warning in stats.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import ray

from tests.support import REPO_ROOT
from tests.support.corpus import write_planted_corpus
from tests.support.ray_cluster import LocalRayHead
from training.config import JobConfig
from training.data.pipeline import prepare_data

DATA = dict(vocab_size=400, tokenizer_train_files=30, valid_fraction=0.2, max_file_bytes=200_000, batch_rows=2,
            dedup=True, near_dedup=0.85, fim_rate=0.5)
# What must agree between runs (not timings, not which tokenizer was given).
SAME = ("files_read", "files_skipped", "files_kept", "files_train", "files_valid", "chunks_train", "chunks_valid",
        "tokens_produced_train", "tokens_produced_valid", "chunks_fingerprint")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_corpus(tmp_path_factory.mktemp("planted"))


def job(output: Path, corpus: Path, **data) -> JobConfig:
    cfg = JobConfig(output=str(output))
    for k, v in {**DATA, "corpus": str(corpus), **data}.items():
        setattr(cfg.data, k, v)
    return cfg


def chunks(root: Path) -> Counter:
    rows: Counter = Counter()
    for split in ("train", "valid"):
        for f in sorted((root / "data" / split).glob("*.parquet")):
            t = pq.read_table(f)
            rows.update((split, tuple(i), tuple(lab)) for i, lab in
                        zip(t.column("input_ids").to_pylist(), t.column("labels").to_pylist()))
    return rows


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(planted, tmp_path_factory):
    """The same corpus and config prepared on 1 and on 4 logical CPUs (2 tokenizer actors)."""
    out = {}
    for cpus in (1, 4):
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            extra = {} if cpus == 1 else {"tokenizer": str(out[1].tokenizer_dir), "tokenizer_actors": 2}
            out[cpus] = prepare_data(job(tmp_path_factory.mktemp(f"cpu{cpus}") / "out", planted.root, **extra))
        finally:
            ray.shutdown()
    return out


@pytest.mark.timeout(300)
def test_every_planted_twin_is_dropped_and_listed_the_same_on_1_and_4_cpus(planted, runs):
    one, four = runs[1], runs[4]
    exact_dropped = {p for g in planted.exact for p in g if p != min(g)}
    near_dropped = {p for g in planted.near for p in g if p != min(g)}
    for run in (one, four):
        s = run.stats
        assert s["files_skipped"] == {"duplicate": len(exact_dropped), "near_duplicate": len(near_dropped)}
        assert s["dedup"]["exact_dropped"] == 3 and s["dedup"]["near_dropped"] == 3 and "warnings" not in s
        dups = jsonl(run.root / "data" / "duplicates.jsonl")
        assert {d["path"]: d["kept"] for d in dups} == {p: min(g) for g in planted.exact for p in g if p != min(g)}
        near = jsonl(run.root / "data" / "near_duplicates.jsonl")
        assert {d["path"]: d["kept"] for d in near} == {p: min(g) for g in planted.near for p in g if p != min(g)}
        for d in near:  # the estimate is near the true Jaccard of the planted pair
            assert d["jaccard"] >= 0.85 and abs(d["jaccard"] - planted.jaccard[d["path"]]) < 0.08
        listed = {d["path"] for d in dups + near}
        assert not listed & set(planted.below)  # just under the threshold: kept
    assert {k: one.stats[k] for k in SAME} == {k: four.stats[k] for k in SAME}
    assert one.stats["dedup"]["near_candidate_pairs"] == four.stats["dedup"]["near_candidate_pairs"]
    assert chunks(one.root) == chunks(four.root)
    assert (one.root / "data" / "near_duplicates.jsonl").read_text() == \
        (four.root / "data" / "near_duplicates.jsonl").read_text()


def _tokenizer_worker(head: LocalRayHead) -> psutil.Process | None:
    """The Ray worker process that runs the tokenize actor of this head's stream."""
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(p.pid) != head.proc.pid:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if "MapWorker" in cmd and "TokenizeStage" in cmd:
                return p
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return None


@pytest.mark.timeout(300)
def test_a_killed_tokenizer_worker_changes_neither_counts_nor_chunks(planted, runs, tmp_path):
    reference = runs[4]  # undisturbed, same config and tokenizer
    out = tmp_path / "killed"
    flags = ["--corpus", str(planted.root), "--tokenizer", str(reference.tokenizer_dir), "--tokenizer-actors", "2",
             "--near-dedup", "0.85", "--dedup"]
    for k in ("vocab_size", "tokenizer_train_files", "valid_fraction", "max_file_bytes", "batch_rows", "fim_rate"):
        flags += [f"--{k.replace('_', '-')}", str(DATA[k])]
    with LocalRayHead(num_cpus=4) as head:
        env = {**head.env, "RAY_ADDRESS": head.address}
        proc = subprocess.Popen([sys.executable, "training/run.py", "--prepare-only", "--output", str(out), *flags],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        staging = out / "data" / "_staging"
        killed, shards_then = None, 0
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline and killed is None:
            shards_then = len(list(staging.glob("*/*.parquet")))
            if shards_then:  # the stream is writing: kill the worker that writes
                worker = _tokenizer_worker(head)
                if worker is not None:
                    worker.send_signal(signal.SIGKILL)
                    killed = worker.pid
            time.sleep(0.05)
        log, _ = proc.communicate(timeout=240)
    assert killed is not None, f"no tokenizer worker found to kill:\n{log[-3000:]}"
    assert proc.returncode == 0, log[-3000:]
    stats = json.loads((out / "data" / "stats.json").read_text())
    total = sum(1 for _ in (out / "data").glob("*/*.parquet"))
    assert shards_then < total  # killed mid-stream, not after it
    assert {k: stats[k] for k in SAME} == {k: reference.stats[k] for k in SAME}, log[-3000:]
    assert "warnings" not in stats
    assert chunks(out) == chunks(reference.root)
