"""Training throughput: this job (Ray Train, 2 CPU workers, DeepSpeed ZeRO-2) against the
course recipe's way (one process, plain HF Trainer, no Ray, no DeepSpeed) in the same run.

Same model (the tiny preset's GPT-2), same chunks (the data stage's Parquet on a slice of
the standard library), same global batch (workers x micro-batch), same steps, same
optimizer and schedule. Throughput is the steady state: from the end of the first step to
the end of the last (start-up and the final eval are left out of both). MFU divides the
model's FLOPs per second (6 x non-position parameters + attention, per token) by a
2048 x 2048 matmul measured here, now, with all cores.

    .venv/bin/python benchmarks/train.py [--steps 40] [--files 120] [--repeats 3]

Each run also reports where a step's time goes (`step_ms`: data, forward, backward, comm,
optimizer, callbacks, other; benchmarks/step_profile.py), and, unless `--weak-scaling off`,
the weak-scaling efficiency: tokens/s of N workers with 1 core each over N x the tokens/s of
one worker with 1 core (each worker's threads pinned to a core of its own, the same
micro-batch per worker), the figure that carries to many nodes, with the machine's own ceiling
for it beside (`hardware_ceiling`: the same single-thread work on N pinned cores at once over
N x alone).

Runs `--repeats` pairs (all single-process runs first: no fork after Ray starts), pairs
them in order and prints one JSON line with every pair, the median ratio and its range.
`--compile both` (the default) runs the distributed job eager and torch.compiled in turn,
each against the same single-process run, so the two variants share the machine's spells.
Timings on a shared machine move with its load: the median of paired runs is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The step profiler is a training plugin: the local cluster's workers import it from here.
HERE = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (HERE, os.environ.get("PYTHONPATH")) if x)
PIN_ENV = "BENCH_PIN_CORES"


def matmul_gflops(dtype_name: str = "float32", n: int = 2048, reps: int = 10) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def flops_per_token(model_config, context: int) -> float:
    from transformers import GPT2LMHeadModel

    from training.train.model import count_parameters

    model = GPT2LMHeadModel(model_config)
    n = count_parameters(model) - model.transformer.wpe.weight.numel()  # position lookup: no matmul
    return 6 * n + 12 * model_config.n_layer * context * model_config.n_embd


def single_process(prepared, cfg, global_batch: int, steps: int) -> dict:
    """The course recipe's loop: one process, map-style dataset, HF Trainer, no Ray, no DeepSpeed."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from training.data.tokenizer import load_tokenizer
    from training.train.metrics import Throughput
    from training.train.model import build_model

    def chunks(path):
        col = pq.read_table(str(path), columns=["input_ids"]).column("input_ids").combine_chunks()
        return np.asarray(col.values.to_numpy(), dtype=np.int64).reshape(len(col), -1)

    class Chunks(torch.utils.data.Dataset):
        def __init__(self, arr):
            self.arr = arr

        def __len__(self):
            return len(self.arr)

        def __getitem__(self, i):
            ids = torch.from_numpy(self.arr[i])
            return {"input_ids": ids, "labels": ids}

    t = cfg.train
    tokens_per_step = global_batch * cfg.data.context_length
    meter = Throughput(0, steps, tokens_per_step)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            meter.step_done(state.global_step)

    from step_profile import attach

    torch.manual_seed(t.seed)
    model = build_model(cfg.model, cfg.data, load_tokenizer(prepared.tokenizer_dir))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=global_batch, per_device_eval_batch_size=global_batch,
            gradient_accumulation_steps=1, learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
            max_steps=steps, logging_steps=t.logging_steps, eval_strategy="no", save_strategy="no",
            report_to=[], disable_tqdm=True, seed=t.seed, use_cpu=True, dataloader_pin_memory=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Chunks(chunks(prepared.train_dir)),
                          eval_dataset=Chunks(chunks(prepared.valid_dir)), data_collator=default_data_collator,
                          callbacks=[Timer()])
        timers = attach(trainer, ray_stream=False)
        trainer.train()
        eval_loss = trainer.evaluate()["eval_loss"]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"tokens_per_s": meter.steady_tokens_per_s(), "final_train_loss": losses[-1], "final_eval_loss": eval_loss,
            "threads": torch.get_num_threads(), "step_ms": timers.summary()}


def distributed(cfg, prepared, workers: int, output: str) -> tuple[dict, dict]:
    """One run of the job; (run.json, the steady tokens/s and rank 0's step profile)."""
    from training.train.job import run_job

    cfg.train.num_workers = workers
    cfg.train.global_batch_size = workers * cfg.train.micro_batch_size
    cfg.output = output
    summary = run_job(cfg, prepared=prepared)
    events = [json.loads(x) for x in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    steady = [e["steady_tokens_per_s"] for e in events if e.get("event") == "attempt_end"][-1]
    profile = [e for e in events if e.get("event") == "step_profile"]
    step = {k: v for k, v in profile[-1].items() if k.endswith("_ms") or k == "steps"} if profile else None
    return summary, {"tokens_per_s": steady, "step_ms": step}


def _core_load(core: int, seconds: float, queue) -> None:
    """One thread pinned to `core`: a training step's two kinds of work in turn (a matmul, and a
    log-softmax over a logits-sized tensor, which is memory-bound); puts rounds per second."""
    import torch

    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    a, b, logits = torch.randn(512, 512), torch.randn(512, 512), torch.randn(4096, 2048)
    t0, rounds = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        torch.log_softmax(logits, -1)
        rounds += 1
    queue.put(rounds / (time.perf_counter() - t0))


def hardware_scaling(workers: int, seconds: float = 4.0) -> float | None:
    """The machine's own ceiling for weak scaling: the same single-thread work on N pinned cores
    at once over N x on one core alone. Cores that share an execution unit (SMT siblings behind
    a VM's vCPUs) or a memory bus show here, with no Ray, DeepSpeed or gloo in the way."""
    import multiprocessing as mp

    cores = sorted(os.sched_getaffinity(0))[:workers]
    if len(cores) < workers:
        return None
    ctx = mp.get_context("spawn")
    rates = {}
    for group in ([cores[0]], cores):
        queue = ctx.Queue()
        procs = [ctx.Process(target=_core_load, args=(c, seconds, queue)) for c in group]
        for p in procs:
            p.start()
        rates[len(group)] = sum(queue.get() for _ in procs)
        for p in procs:
            p.join()
    return round(rates[len(cores)] / (len(cores) * rates[1]), 3)


def weak_scaling(cfg, prepared, workers: int, out: Path) -> dict:
    """N workers x 1 core against one worker x 1 core, each pinned to its own core; beside it,
    the machine's ceiling for the same comparison (`hardware_scaling`)."""
    ceiling = hardware_scaling(workers)
    os.environ[PIN_ENV] = "1"
    try:
        _, one = distributed(cfg, prepared, 1, str(out / "weak_1"))
        _, n = distributed(cfg, prepared, workers, str(out / f"weak_{workers}"))
    finally:
        os.environ.pop(PIN_ENV, None)
    eff = round(n["tokens_per_s"] / (workers * one["tokens_per_s"]), 3) if n["tokens_per_s"] and one["tokens_per_s"] else None
    return {"workers": workers, "efficiency": eff, "hardware_ceiling": ceiling,
            "one_worker_tokens_per_s": one["tokens_per_s"],
            "n_workers_tokens_per_s": n["tokens_per_s"], "one_worker_step_ms": one["step_ms"],
            "n_workers_step_ms": n["step_ms"]}


def checkpoint_cost(a) -> None:
    """`--checkpoint-cost`: what a checkpoint save costs the training loop, with the upload
    synchronous (report blocks until the copy to storage is done) and asynchronous (Ray
    Train's CheckpointUploadMode.ASYNC, the default). Three distributed runs per repeat,
    interleaved: evaluating every `--save-every` steps and saving only at the end (the
    baseline), then saving at every evaluation with each upload mode. A save's cost is the
    steady time the run lost against the baseline, over the saves inside the steady span."""
    from short_job import short_tiny_job

    from training.data.pipeline import prepare_data
    from training.train.job import run_job

    out = Path(a.output or tempfile.mkdtemp(prefix="bench_ckpt_"))
    cfg = short_tiny_job(str(out / "run"), a.files, a.workers, a.steps)
    cfg.train.global_batch_size = a.workers * cfg.train.micro_batch_size
    cfg.train.eval_steps = a.save_every
    cfg.validate()
    prepared = prepare_data(cfg)
    saves = len(range(a.save_every, a.steps, a.save_every))  # inside the steady span (the last is after it)
    step_s: dict[str, list[float]] = {"no_saves": [], "sync": [], "async": []}
    for i in range(a.repeats):
        for name in step_s:
            cfg.train.save_steps = a.steps if name == "no_saves" else a.save_every
            cfg.train.async_checkpoint = name == "async"
            cfg.output = str(out / f"run{i}_{name}")
            summary = run_job(cfg, prepared=prepared)
            ends = [json.loads(x) for x in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
            steady = [e["steady_tokens_per_s"] for e in ends if e.get("event") == "attempt_end"][-1]
            step_s[name].append(summary["tokens_per_step"] / steady)

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    base = median(step_s["no_saves"])
    # seconds the loop lost per save: (run time with saves - baseline) / saves
    cost = {k: round((median(step_s[k]) - base) * (a.steps - 1) / max(saves, 1), 4) for k in ("sync", "async")}
    print(json.dumps({  # the scalars first: benchmarks/record.py's headline takes the leading ones
        "benchmark": "train_checkpoint",
        "cost_per_save_s_sync": cost["sync"], "cost_per_save_s_async": cost["async"],
        "step_s_no_saves": round(base, 4), "steps": a.steps, "save_every": a.save_every,
        "saves_in_steady_span": saves, "workers": a.workers, "repeats": a.repeats,
        "median_step_s": {k: round(median(v), 4) for k, v in step_s.items()},
        "step_s": {k: [round(x, 4) for x in v] for k, v in step_s.items()},
        "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--files", type=int, default=120, help="standard-library files in the corpus")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="precision of the distributed run, auto as the job decides it (bf16 where the CPU has "
                         "native bf16); the single process stays fp32, the course recipe's")
    ap.add_argument("--compile", default="both", choices=["off", "on", "both"],
                    help="torch.compile the distributed run's model: off, on, or both in turn, each paired "
                         "with the same single-process run (the single process stays eager)")
    ap.add_argument("--output", default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--repeats", type=int, default=3, help="paired runs; the median ratio is reported")
    ap.add_argument("--weak-scaling", default="on", choices=["on", "off"])
    ap.add_argument("--checkpoint-cost", action="store_true",
                    help="measure instead what a checkpoint save costs a step, sync vs async upload")
    ap.add_argument("--save-every", type=int, default=5, help="with --checkpoint-cost: steps between saves")
    a = ap.parse_args()
    if a.checkpoint_cost:
        return checkpoint_cost(a)
    os.environ["CODECOMPLETE_TRAIN_PLUGINS"] = "step_profile"

    from short_job import short_tiny_job

    from training.data.pipeline import prepare_data
    from training.data.tokenizer import load_tokenizer
    from training.train.cpu_features import bf16_native, read_cpuinfo
    from training.train.model import gpt2_config
    from training.train.plan import choose_precision

    out = Path(a.output or tempfile.mkdtemp(prefix="bench_train_"))
    cfg = short_tiny_job(str(out / "run"), a.files, a.workers, a.steps)
    # What the job's auto picks on this machine's CPU (the workers run here)
    precision = choose_precision(a.precision, False, {"cpu_bf16_native": bf16_native(read_cpuinfo()["flags"])})
    cfg.train.precision = precision
    cfg.train.global_batch_size = a.workers * cfg.train.micro_batch_size
    cfg.validate()

    prepared = prepare_data(cfg)  # also starts the local Ray cluster the job reuses
    import ray

    ray.shutdown()  # the single process runs with the machine to itself

    fpt = flops_per_token(gpt2_config(cfg.model, cfg.data, load_tokenizer(prepared.tokenizer_dir)),
                          cfg.data.context_length)
    peak_fp32 = matmul_gflops("float32")
    # Only where asked: CPUs without avx512_bf16/AMX run bf16 matmuls on a slow reference path.
    peak_bf16 = matmul_gflops("bfloat16", n=1024, reps=3) if precision == "bf16" else None
    global_batch = cfg.train.global_batch_size
    singles = [single_process(prepared, cfg, global_batch, a.steps) for _ in range(a.repeats)]
    peak = peak_bf16 if precision == "bf16" else peak_fp32

    def mfu(tps, peak_gflops):
        return round(tps * fpt / (peak_gflops * 1e9), 4) if tps else None

    variants = {"off": [False], "on": [True], "both": [False, True]}[a.compile]
    pairs: dict[str, list] = {("compile" if c else "eager"): [] for c in variants}
    for i, single in enumerate(singles):
        for compiled in variants:  # interleaved, so a slow spell of the machine hits both alike
            name = "compile" if compiled else "eager"
            cfg.train.compile = compiled
            summary, run = distributed(cfg, prepared, a.workers, str(out / f"run{i}_{name}"))
            steady = run["tokens_per_s"]
            pairs[name].append({
                "distributed": {"tokens_per_s": steady, "step_ms": run["step_ms"], "mfu": mfu(steady, peak),
                                "mfu_of_fp32_matmul": mfu(steady, peak_fp32), "zero_stage": summary["zero_stage"],
                                "final_train_loss": summary["final_train_loss"],
                                "final_eval_loss": summary["final_eval_loss"]},
                "single_process": {**single, "mfu": mfu(single["tokens_per_s"], peak_fp32)},
                "ratio": round(steady / single["tokens_per_s"], 3) if steady and single["tokens_per_s"] else None,
            })

    def median(xs):
        xs = sorted(x for x in xs if x)
        return xs[len(xs) // 2] if xs else None

    def summary_of(runs):
        ratios = sorted(p["ratio"] for p in runs if p["ratio"])
        return {
            "median_ratio": median(ratios), "ratio_range": [ratios[0], ratios[-1]] if ratios else None,
            "median_tokens_per_s": {"distributed": median(p["distributed"]["tokens_per_s"] for p in runs),
                                    "single_process": median(p["single_process"]["tokens_per_s"] for p in runs)},
            # mfu: against the run's own precision's matmul; mfu_of_fp32_matmul: the yardstick
            "median_mfu_of_fp32_matmul": median(p["distributed"]["mfu_of_fp32_matmul"] for p in runs),
            "median_mfu": {"distributed": median(p["distributed"]["mfu"] for p in runs),
                           "single_process": median(p["single_process"]["mfu"] for p in runs)},
            "median_final_eval_loss": median(p["distributed"]["final_eval_loss"] for p in runs),
            "pairs": runs,
        }

    cfg.train.compile = False
    weak = weak_scaling(cfg, prepared, a.workers, out) if a.weak_scaling == "on" else None

    print(json.dumps({
        "benchmark": "train",
        "model": f"gpt2 {cfg.model.n_layer}x{cfg.model.n_embd}, vocab {cfg.data.vocab_size}, ctx {cfg.data.context_length}",
        "steps": a.steps, "global_batch": global_batch, "tokens_per_step": global_batch * cfg.data.context_length,
        "workers": a.workers, "precision": precision, "repeats": a.repeats,
        **{name: summary_of(runs) for name, runs in pairs.items()},
        "weak_scaling": weak,
        "matmul_gflops": {"fp32": round(peak_fp32, 1), "bf16": round(peak_bf16, 1) if peak_bf16 else None},
        "flops_per_token": fpt,
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
