"""The per-worker pieces that need no cluster: file ownership, batches, digests, eval cache.

The loop itself runs under Ray Train in tests/test_job.py (job submit, parameter
equality across ranks, worker death, resume).
"""

from __future__ import annotations

import numpy as np
import torch

from training.train_loop import cached_batches, collate, owned_by, param_digest


def test_each_checkpoint_file_has_exactly_one_owner_rank():
    # DeepSpeed ZeRO-2 + HF checkpoint layout: per-rank optimizer shards, the rest shared.
    assert owned_by("global_step8/zero_pp_rank_1_mp_rank_00_optim_states.pt") == 1
    assert owned_by("global_step8/zero_pp_rank_0_mp_rank_00_optim_states.pt") == 0
    assert owned_by("global_step8/bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert owned_by("rng_state_2.pth") == 2
    for shared in ("model.safetensors", "config.json", "trainer_state.json", "latest", "rng_state.pth",
                   "scheduler.pt", "global_step8/mp_rank_00_model_states.pt", "zero_to_fp32.py"):
        assert owned_by(shared) == 0, shared


def test_collate_turns_parquet_lists_into_int64_batches():
    rows = np.empty(2, dtype=object)
    rows[0], rows[1] = np.arange(8, dtype=np.int32), np.arange(8, 16, dtype=np.int32)
    out = collate({"input_ids": rows, "labels": rows.copy()})
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].shape == (2, 8)
    assert torch.equal(out["labels"], out["input_ids"])
    dense = collate({"input_ids": np.ones((3, 4), np.int32), "labels": np.ones((3, 4), np.int32)})
    assert dense["labels"].shape == (3, 4)


def test_param_digest_sees_any_change_in_any_weight():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    torch.manual_seed(0)
    b = torch.nn.Linear(4, 3)
    assert param_digest(a) == param_digest(b)
    with torch.no_grad():
        b.bias[1] += 1e-6
    assert param_digest(a) != param_digest(b)


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
