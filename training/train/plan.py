"""What a run will do, decided before any worker starts: workers, CPUs, batch, steps, precision.

Pure functions of the config and of what the cluster reports, so every rule here is unit
tested without a cluster (tests/unit/train/test_plan.py).

CPU budgeting. Ray's logical CPUs are reservations, not cores. A training worker that
reserves a whole CPU on a 2-CPU head leaves Ray Data nothing to schedule the training
stream's Parquet reads on, and the job waits forever (a plain `ray start --head` did
exactly that). So, unless `--cpus-per-worker` is given, CPU workers together reserve at
most half of the cluster's CPUs (never more than 1 each) and the read tasks reserve a
fraction of what is left: on 1, 2 and 4 CPUs the tiny job always has room for both. The
OS still shares the real cores between all of them; the reservation only decides what Ray
is willing to start. Ray sets a worker's torch threads from its reservation (1 thread for
anything up to 1 CPU), so a fractional reservation trains exactly as a whole one.

Batch. `train.global_batch_size` is sequences per optimizer step over all workers, the
recipe's unit (32 x grad-accum 8 = 256 on one device). Each worker takes
`micro_batch_size` per forward pass, and accumulation is derived:
global / (micro x workers). The same global batch on 1 or 8 workers gives the same number
of optimizer steps per epoch and so the same learning-rate schedule.

Elastic ranges. `--num-workers 2-8` lets Ray Train run on any world size in the range, and a
restart can land on any of them, so every size in it must keep the global batch: a range
holding one that cannot is refused here, naming the sizes that can, before any data is read
or any cluster is asked. max_steps is fixed for the whole run (the schedule is one curve):
one epoch is counted on the range's largest size, whose equal shards drop the most chunks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from training.config import ConfigError, JobConfig
from training.config.job import worker_range

DEFAULT_CPU_WORKERS = 2
TRAIN_CPU_SHARE = 0.5  # auto plan: CPU workers together reserve at most this share
MIN_AUTO_CPUS = 0.25  # ... but each at least this: 64 CPU workers on 4 CPUs is a mistake, not a plan


@dataclass
class Plan:
    workers: int
    use_gpu: bool
    cpus_per_worker: float
    read_cpus: float  # what each Ray Data read task of the training/validation stream reserves
    global_batch_size: int = 0
    micro_batch_size: int = 0
    gradient_accumulation_steps: int = 0
    max_steps: int = 0
    min_workers: int = 0  # elastic: the range Ray Train may pick from (min == max == workers if fixed)
    accumulation: dict[int, int] = field(default_factory=dict)  # world size -> grad-accum keeping the global batch

    def __post_init__(self) -> None:
        self.min_workers = self.min_workers or self.workers

    @property
    def elastic(self) -> bool:
        return self.min_workers < self.workers

    def scaling_workers(self) -> int | tuple[int, int]:
        """ScalingConfig(num_workers=...): a count, or (min, max) for Ray Train's elastic policy."""
        return (self.min_workers, self.workers) if self.elastic else self.workers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- workers and CPUs ------------------------------------------------------------------------


def plan_workers(cfg: JobConfig, cap: dict[str, float]) -> Plan:
    """Workers, device and CPU reservations for this cluster, or a ConfigError naming the field.

    cap: CPU/GPU the cluster can ever offer (autoscaler max included), see job.cluster_capacity."""
    t = cfg.train
    use_gpu = t.use_gpu if t.use_gpu is not None else cap["GPU"] > 0
    if use_gpu and cap["GPU"] < 1:
        raise ConfigError("train.use_gpu=True: the cluster has no GPUs and cannot get any")
    lo_hi = worker_range(t.num_workers)
    if lo_hi is not None:
        lo, n = lo_hi
    elif use_gpu:
        n = int(cap["GPU"])
    elif t.cpus_per_worker:
        n = max(1, min(DEFAULT_CPU_WORKERS, int(cap["CPU"] // t.cpus_per_worker)))
    else:
        n = DEFAULT_CPU_WORKERS
    if t.cpus_per_worker is not None:
        per = float(t.cpus_per_worker)
    elif use_gpu:
        per = 1.0  # GPU nodes have CPUs to spare; the GPU is the reservation that matters
    else:
        per = max(MIN_AUTO_CPUS, min(1.0, cap["CPU"] * TRAIN_CPU_SHARE / n)) if cap["CPU"] > 0 else 1.0
    if lo_hi is None:
        lo = n
    shown = n if lo == n else f"{lo}-{n}"
    # An elastic range must fit at its top: Ray Train asks the autoscaler for the max and
    # grows to it whenever it can, and a top the cluster can never reach is a typo.
    need_cpu = n * per
    if need_cpu > cap["CPU"] + 1e-9:
        scale = " (autoscaler max included)" if cap.get("autoscaling") else ""
        raise ConfigError(f"train.num_workers={shown}: needs {need_cpu:g} CPUs ({n} x train.cpus_per_worker="
                          f"{per:g}) but the cluster can offer at most {cap['CPU']:g}{scale}")
    if use_gpu and n > cap["GPU"]:
        raise ConfigError(f"train.num_workers={shown}: needs {n} GPUs but the cluster can offer at most "
                          f"{cap['GPU']:g}")
    left = cap["CPU"] - need_cpu
    if left <= 1e-9:
        print(f"[job] warning: {n} workers x {per:g} CPUs take all {cap['CPU']:g} CPUs; Ray Data needs some to read "
              "the stream and will stall (lower --cpus-per-worker, or leave it unset for the automatic plan)",
              flush=True)
    # Reads of the training and the validation stream can be pending at once: each gets a
    # quarter of what the workers leave, capped at Ray Data's default of 1 CPU.
    read = min(1.0, max(left, 0.0) / 4) if left > 1e-9 else 0.25
    return Plan(workers=n, use_gpu=use_gpu, cpus_per_worker=per, read_cpus=round(read, 4), min_workers=lo,
                accumulation=accumulation_table(t.global_batch_size, t.micro_batch_size, lo, n))


# ---- batch and steps ---------------------------------------------------------------------------


def accumulation_steps(global_batch: int, micro: int, workers: int) -> int:
    """global = micro x workers x accumulation, or a ConfigError saying what would divide."""
    per_pass = micro * workers
    if global_batch % per_pass:
        fits = [m for m in range(micro, 0, -1) if global_batch % (m * workers) == 0]
        sizes = ", ".join(map(str, sizes_that_keep(global_batch, micro, max(8, 2 * workers))))
        hint = f"--micro-batch-size {fits[0]}" if fits else f"another --num-workers (these keep it: {sizes})"
        raise ConfigError(f"train.global_batch_size={global_batch}: not divisible by train.micro_batch_size={micro} "
                          f"x {workers} workers = {per_pass}; use {hint} or a global batch that is a multiple of "
                          f"{per_pass}")
    return global_batch // per_pass


def sizes_that_keep(global_batch: int, micro: int, upto: int) -> list[int]:
    """World sizes 1..upto on which micro x workers x accumulation = global_batch."""
    return [w for w in range(1, upto + 1) if global_batch % (micro * w) == 0]


def accumulation_table(global_batch: int, micro: int, lo: int, hi: int) -> dict[int, int]:
    """{world size: accumulation} for every size in lo..hi, or a ConfigError naming the sizes
    that keep the global batch (and, for a range, the ranges made of them)."""
    if lo == hi:
        return {hi: accumulation_steps(global_batch, micro, hi)}
    bad = [w for w in range(lo, hi + 1) if global_batch % (micro * w)]
    if bad:
        ok = sizes_that_keep(global_batch, micro, hi)
        ranges, fixed, start = [], [], None  # runs of consecutive good sizes: the ranges that work
        for w in range(1, hi + 2):
            if w <= hi and w in ok:
                start = w if start is None else start
            elif start is not None:
                (ranges.append(f"{start}-{w - 1}") if w - 1 > start else fixed.append(str(start)))
                start = None
        hints = ([f"a range of sizes that all keep it ({', '.join(ranges)})"] if ranges else []) + \
                ([f"a fixed count ({', '.join(fixed)})"] if fixed else [])
        raise ConfigError(f"train.num_workers={lo}-{hi}: the global batch {global_batch} = micro-batch {micro} x "
                          f"workers x grad-accum holds on {', '.join(map(str, ok)) or 'no'} worker(s), not on "
                          f"{', '.join(map(str, bad))}; use {' or '.join(hints + [''])}"
                          f"a --global-batch-size / --micro-batch-size that every size in {lo}-{hi} divides")
    return {w: global_batch // (micro * w) for w in range(lo, hi + 1)}


def check_batch(cfg: JobConfig) -> None:
    """The batch/worker check that needs no cluster: run before any data or hub read."""
    lo_hi = worker_range(cfg.train.num_workers)
    if lo_hi is not None:
        accumulation_table(cfg.train.global_batch_size, cfg.train.micro_batch_size, *lo_hi)


def steps_per_epoch(chunks_train: int, workers: int, global_batch: int) -> int:
    # Ray Data splits the stream into equal shards (chunks // workers each); every optimizer
    # step eats global_batch / workers chunks of each shard.
    return (chunks_train // workers) // (global_batch // workers)


def plan_batch(cfg: JobConfig, stats: dict[str, Any], plan: Plan) -> Plan:
    """Fill the batch fields and max_steps into the worker plan."""
    t, n = cfg.train, plan.workers  # n: the range's top when elastic (the fewest steps per epoch)
    accum = accumulation_steps(t.global_batch_size, t.micro_batch_size, n)
    per_epoch = min(steps_per_epoch(int(stats["chunks_train"]), w, t.global_batch_size)
                    for w in range(plan.min_workers, n + 1))
    if per_epoch < 1 and t.max_steps is None:
        raise ConfigError(f"data.corpus: {stats['chunks_train']} training chunks are fewer than one optimizer step "
                          f"(train.global_batch_size={t.global_batch_size}); use a larger corpus or a smaller "
                          "--global-batch-size")
    if int(stats.get("chunks_valid", 0)) < n:
        raise ConfigError(f"data.valid_fraction: the validation split has {stats.get('chunks_valid', 0)} chunks, "
                          f"fewer than the {n} workers that each evaluate a shard of it; raise "
                          "--valid-fraction or give --valid-corpus")
    plan.global_batch_size, plan.micro_batch_size = t.global_batch_size, t.micro_batch_size
    plan.gradient_accumulation_steps = accum
    plan.max_steps = t.max_steps or per_epoch * t.num_epochs
    return plan


def plan_for_resume(cfg: JobConfig, state: dict[str, Any]) -> Any:
    """The worker count (or range) a resumed run uses: the saved one unless given. Another
    world size than the checkpoint's is fine: the ZeRO-2 optimizer state is re-sharded on
    load (training/train/elastic.py); the batch check then holds for the new size."""
    if cfg.train.num_workers is not None:
        return cfg.train.num_workers
    saved = state.get("plan", {}) or {}
    lo, hi = saved.get("min_workers"), saved.get("workers", state.get("workers"))
    if hi is None:
        return None
    return (int(lo), int(hi)) if lo and int(lo) < int(hi) else int(hi)


# ---- precision ---------------------------------------------------------------------------------


def choose_precision(requested: str, use_gpu: bool, probe: Optional[dict[str, Any]] = None) -> str:
    """On GPUs bf16 where the GPU has it natively, else fp16; on CPUs bf16 where every
    worker's CPU has native bf16 (avx512_bf16 or AMX: `cpu_features.bf16_native`), else fp32.

    probe: what the training workers found on their own machines (`preflight.gpu_probe`): the
    driver often runs on a head without GPUs, or on another CPU than the workers, so its own
    torch.cuda and /proc/cpuinfo say nothing about theirs. bf16 is chosen only on native
    support (`including_emulation=False`): V100/T4 emulate it slowly, and a CPU without the
    instructions runs bf16 matmuls on a slow reference path."""
    if requested != "auto":
        return requested
    probe = probe or {}
    if not use_gpu:
        return "bf16" if probe.get("cpu_bf16_native") else "fp32"
    return "bf16" if probe.get("cuda") and probe.get("bf16_native") else "fp16"
