"""The run plan, decided before any worker starts: CPUs, batch, steps, resume, precision.

Pure functions of the config and the cluster's reported capacity: no cluster needed.
"""

from __future__ import annotations

import pytest
from transformers import get_cosine_schedule_with_warmup

from training.config import ConfigError, JobConfig
from training.train.plan import Plan, accumulation_steps, choose_precision, plan_batch, plan_for_resume, plan_workers


def cap(cpus: float, gpus: float = 0.0, autoscaling: bool = False) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus, "CPU_now": cpus, "GPU_now": gpus, "autoscaling": float(autoscaling)}


@pytest.mark.parametrize("cpus, per_worker", [(1, 0.25), (2, 0.5), (4, 1.0), (16, 1.0)])
def test_cpu_workers_leave_the_stream_reads_room_on_plain_heads(cpus, per_worker):
    plan = plan_workers(JobConfig.from_preset("tiny"), cap(cpus))
    assert (plan.workers, plan.use_gpu, plan.cpus_per_worker) == (2, False, per_worker)
    left = cpus - plan.workers * plan.cpus_per_worker
    # Both streams (train, valid) can have a read task placed beside the workers.
    assert left >= 2 * plan.read_cpus > 0 and plan.read_cpus <= 1.0


def test_explicit_cpus_per_worker_and_capacity_errors():
    cfg = JobConfig.from_preset("tiny")
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, 960  # kept on 2, 3, 5 and 64 workers
    cfg.train.cpus_per_worker = 0.5
    assert plan_workers(cfg, cap(4)).cpus_per_worker == 0.5
    # A 0-CPU head that may scale to 4 CPUs is accepted; the check counts the maximum.
    cfg.train.cpus_per_worker, cfg.train.num_workers = 1, 3
    assert plan_workers(cfg, cap(4, autoscaling=True)).workers == 3
    cfg.train.num_workers = 5
    with pytest.raises(ConfigError, match=r"train.num_workers=5: needs 5 CPUs .* at most 4 \(autoscaler max"):
        plan_workers(cfg, cap(4, autoscaling=True))
    cfg.train.num_workers, cfg.train.cpus_per_worker = 64, None  # automatic share, but not below 1/4 CPU
    with pytest.raises(ConfigError, match=r"needs 16 CPUs \(64 x train.cpus_per_worker=0.25\)"):
        plan_workers(cfg, cap(4))
    cfg.train.num_workers = None
    gpu_plan = plan_workers(cfg, cap(32, gpus=4))
    assert (gpu_plan.workers, gpu_plan.use_gpu, gpu_plan.cpus_per_worker) == (4, True, 1.0)
    cfg.train.use_gpu = True
    with pytest.raises(ConfigError, match="no GPUs"):
        plan_workers(cfg, cap(4))


def lr_curve(max_steps: int, warmup: int, peak: float = 5e-4) -> list[float]:
    import torch

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_cosine_schedule_with_warmup(opt, warmup, max_steps)
    out = []
    for _ in range(max_steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


def test_gpt2_small_keeps_the_recipes_batch_and_schedule_on_1_2_and_8_workers():
    cfg = JobConfig.from_preset("gpt2-small")
    stats = {"chunks_train": 1_000_000, "chunks_valid": 100}
    plans = {}
    for n in (1, 2, 8):
        cfg.train.num_workers = n
        plans[n] = plan_batch(cfg, stats, plan_workers(cfg, cap(64)))
    assert {n: p.gradient_accumulation_steps for n, p in plans.items()} == {1: 8, 2: 4, 8: 1}
    assert {p.global_batch_size for p in plans.values()} == {256}
    assert {p.micro_batch_size * p.workers * p.gradient_accumulation_steps for p in plans.values()} == {256}
    assert {p.max_steps for p in plans.values()} == {1_000_000 // 256}
    curves = {n: lr_curve(p.max_steps, cfg.train.warmup_steps) for n, p in plans.items()}
    assert curves[1] == curves[2] == curves[8]


def test_tiny_keeps_64_and_a_batch_that_does_not_divide_is_refused():
    cfg = JobConfig.from_preset("tiny")
    p = plan_batch(cfg, {"chunks_train": 6400, "chunks_valid": 10}, plan_workers(cfg, cap(2)))
    assert (p.global_batch_size, p.micro_batch_size, p.gradient_accumulation_steps) == (64, 32, 1)
    assert p.max_steps == cfg.train.max_steps  # the preset fixes its steps (configs/tiny.yaml)
    cfg.train.max_steps = None  # else one epoch
    assert plan_batch(cfg, {"chunks_train": 6400, "chunks_valid": 10}, plan_workers(cfg, cap(2))).max_steps == 100
    assert accumulation_steps(256, 32, 1) == 8
    with pytest.raises(ConfigError, match=r"train.global_batch_size=192: not divisible by .* = 256; use --micro-batch-size 24"):
        accumulation_steps(192, 32, 8)
    with pytest.raises(ConfigError, match=r"= 96; use another --num-workers \(these keep it: 1, 2, 4, 8\)"):
        accumulation_steps(256, 32, 3)
    with pytest.raises(ConfigError, match="fewer than one optimizer step"):
        plan_batch(cfg, {"chunks_train": 60, "chunks_valid": 10}, plan_workers(cfg, cap(2)))
    with pytest.raises(ConfigError, match="validation split has 1 chunks"):
        plan_batch(cfg, {"chunks_train": 6400, "chunks_valid": 1}, plan_workers(cfg, cap(2)))
    cfg.train.max_steps = 7
    assert plan_batch(cfg, {"chunks_train": 6400, "chunks_valid": 10}, plan_workers(cfg, cap(2))).max_steps == 7


def test_resume_takes_the_saved_worker_count_unless_another_is_given():
    cfg = JobConfig.from_preset("tiny")
    assert plan_for_resume(cfg, {"workers": 2}) == 2
    assert plan_for_resume(cfg, {"workers": 2, "plan": {"workers": 2, "min_workers": 1}}) == (1, 2)
    # Another world size is allowed: the ZeRO-2 state is re-sharded on load (training/train/elastic.py).
    cfg.train.num_workers = 4
    assert plan_for_resume(cfg, {"workers": 2}) == 4


@pytest.mark.parametrize("requested, use_gpu, probe, chosen", [
    ("auto", False, None, "fp32"),
    ("auto", True, {"cuda": True, "bf16_native": True}, "bf16"),     # A10G, A100, H100
    ("auto", True, {"cuda": True, "bf16_native": False}, "fp16"),    # V100, T4: bf16 only emulated
    ("auto", True, {"cuda": False, "bf16_native": False}, "fp16"),
    ("auto", True, None, "fp16"),                                    # no probe: never guess bf16
    ("bf16", False, None, "bf16"),
    ("fp32", True, {"cuda": True, "bf16_native": True}, "fp32"),
    ("auto", False, {"cpu_bf16_native": True}, "bf16"),              # Zen 4, Sapphire Rapids
    ("auto", False, {"cpu_bf16_native": False}, "fp32"),             # Zen 3, Ice Lake: bf16 on a slow path
    ("auto", True, {"cuda": True, "bf16_native": False, "cpu_bf16_native": True}, "fp16"),  # the GPU decides
    ("fp32", False, {"cpu_bf16_native": True}, "fp32"),
])
def test_precision_is_decided_from_what_the_workers_gpu_has(requested, use_gpu, probe, chosen):
    assert choose_precision(requested, use_gpu, probe) == chosen


def test_plan_is_recorded_whole():
    p = Plan(workers=2, use_gpu=False, cpus_per_worker=0.5, read_cpus=0.25)
    assert set(p.to_dict()) >= {"workers", "global_batch_size", "micro_batch_size", "gradient_accumulation_steps"}
