"""The per-worker pieces that need no cluster: batches and the eval cache.

The loop itself runs under Ray Train in tests/e2e/test_job.py (job submit, parameter
equality across ranks, worker death, resume).
"""

from __future__ import annotations

import numpy as np
import torch

from training.train.loop import cached_batches, collate


def test_collate_turns_parquet_lists_into_int64_batches():
    rows = np.empty(2, dtype=object)
    rows[0], rows[1] = np.arange(8, dtype=np.int32), np.arange(8, 16, dtype=np.int32)
    out = collate({"input_ids": rows, "labels": rows.copy()})
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].shape == (2, 8)
    assert torch.equal(out["labels"], out["input_ids"])
    dense = collate({"input_ids": np.ones((3, 4), np.int32), "labels": np.ones((3, 4), np.int32)})
    assert dense["labels"].shape == (3, 4)


def test_cached_batches_reads_the_stream_once_and_replays_it():
    reads = []

    class Stream:
        def __iter__(self):
            reads.append(1)
            yield from ({"x": i} for i in range(3))

    it = cached_batches(Stream())
    assert [b["x"] for b in it] == [0, 1, 2]
    assert [b["x"] for b in it] == [0, 1, 2]
    assert len(reads) == 1


def test_scratch_dir_is_cleared_on_entry_so_a_killed_attempt_leaves_nothing():
    import os

    from training.train.loop import scratch_dir

    d = scratch_dir("test_run_scratch", 3)
    os.makedirs(os.path.join(d, "checkpoint-4", "global_step4"))
    open(os.path.join(d, "checkpoint-4", "global_step4", "zero_pp_rank_3_mp_rank_00_optim_states.pt"), "w").close()
    again = scratch_dir("test_run_scratch", 3)  # the restarted attempt on the same node
    assert again == d and os.listdir(again) == []
    os.rmdir(again)


def test_cpu_workers_never_build_deepspeeds_shared_memory_op(monkeypatch):
    # A build killed midway leaves a lock that every later job waits on for ever: the patch
    # must land on deepspeed.comm.torch itself (not on torch, which a plain import binds).
    import importlib

    from training.train.loop import skip_deepspeed_shm_op

    comm = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(comm, "build_shm_op", comm.build_shm_op)  # undone after the test
    skip_deepspeed_shm_op()
    assert comm.build_shm_op() is None
