"""Rank-aware pieces that need no cluster: which rank owns a checkpoint file, weight digests.

The Trainer subclass and callbacks run under Ray Train in tests/e2e/test_job.py.
"""

from __future__ import annotations

import torch

from training.train.rank_aware import owned_by, param_digest


def test_each_checkpoint_file_has_exactly_one_owner_rank():
    # DeepSpeed ZeRO-2 + HF checkpoint layout: per-rank optimizer shards, the rest shared.
    assert owned_by("global_step8/zero_pp_rank_1_mp_rank_00_optim_states.pt") == 1
    assert owned_by("global_step8/zero_pp_rank_0_mp_rank_00_optim_states.pt") == 0
    assert owned_by("global_step8/bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert owned_by("rng_state_2.pth") == 2
    for shared in ("model.safetensors", "config.json", "trainer_state.json", "latest", "rng_state.pth",
                   "scheduler.pt", "global_step8/mp_rank_00_model_states.pt", "zero_to_fp32.py"):
        assert owned_by(shared) == 0, shared


def test_param_digest_sees_any_change_in_any_weight():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    torch.manual_seed(0)
    b = torch.nn.Linear(4, 3)
    assert param_digest(a) == param_digest(b)
    with torch.no_grad():
        b.bias[1] += 1e-6
    assert param_digest(a) != param_digest(b)
