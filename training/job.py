"""The driver: check the cluster, run the data stage, train with Ray Train, export.

`python training/run.py` and `ray job submit -- python training/run.py` both end here.
Order matters for bad input: everything that can be checked without training (DeepSpeed
config, cluster size, corpus yield, step count) fails with one line before any worker
starts.

Worker-count rule (documented in docs/training.md): the cluster's capacity is the larger
of what it has now and what its autoscaler may add (the node groups' max counts from the
autoscaler's cluster config). A run is rejected only when num_workers x cpus_per_worker
(or num_workers GPUs) exceeds that capacity, so a head with 0 CPUs that can scale up is
accepted. The default is one worker per GPU on a GPU cluster, else 2 CPU workers (fewer
if the cluster can never hold 2).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from training.config import ConfigError, JobConfig, resolve_path

DEFAULT_CPU_WORKERS = 2
RUN_STATE = "run_state.json"  # the Ray Train run name + storage that --resume continues


# ---- checks that need no cluster ---------------------------------------------------------


def load_deepspeed_config(path: str) -> dict[str, Any]:
    """Parse and sanity-check the DeepSpeed JSON; one-line ConfigError otherwise."""
    p = resolve_path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config={path!r}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config={path!r}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"train.deepspeed_config={path!r}: must hold a JSON object")
    zero = raw.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed_config={path!r}: zero_optimization.stage must be 0, 1, 2 or 3")
    if raw.get("train_batch_size") == "auto":
        # HF fills it for world size 1 while DeepSpeed sees N ranks and asserts (STACK-NOTES).
        raise ConfigError(f"train.deepspeed_config={path!r}: drop \"train_batch_size\": \"auto\" "
                          "(it is derived from micro batch x grad-accum x workers)")
    return raw


def check_schedule(cfg: JobConfig) -> None:
    t = cfg.train
    if t.save_steps % t.eval_steps != 0:
        raise ConfigError(f"train.save_steps={t.save_steps}: must be a multiple of train.eval_steps="
                          f"{t.eval_steps} (checkpoints are ranked by the eval loss of their step)")


def resolve_precision(precision: str, use_gpu: bool) -> str:
    if precision != "auto":
        return precision
    if not use_gpu:
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"


# ---- the cluster -------------------------------------------------------------------------


def cluster_capacity() -> dict[str, float]:
    """CPU/GPU the cluster has now, or may have once its autoscaler has scaled up."""
    import ray

    now = ray.cluster_resources()
    autoscaler_max: dict[str, float] = {}
    try:  # what Ray Data itself uses to size itself on autoscaling clusters
        from ray._private.state import state

        autoscaler_max = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - private API; without it we judge by what is there
        autoscaler_max = {}
    cap = {k: max(float(now.get(k, 0)), float(autoscaler_max.get(k, 0))) for k in ("CPU", "GPU")}
    cap["CPU_now"], cap["GPU_now"] = float(now.get("CPU", 0)), float(now.get("GPU", 0))
    cap["autoscaling"] = float(bool(autoscaler_max))
    return cap


def plan_workers(cfg: JobConfig, cap: dict[str, float]) -> tuple[int, bool]:
    """(num_workers, use_gpu) for this cluster, or a ConfigError naming the field."""
    t = cfg.train
    use_gpu = t.use_gpu if t.use_gpu is not None else cap["GPU"] > 0
    if use_gpu and cap["GPU"] < 1:
        raise ConfigError("train.use_gpu=True: the cluster has no GPUs and cannot get any")
    if t.num_workers is not None:
        n = t.num_workers
    elif use_gpu:
        n = int(cap["GPU"])
    else:
        fit = int(cap["CPU"] // t.cpus_per_worker) if t.cpus_per_worker else DEFAULT_CPU_WORKERS
        n = max(1, min(DEFAULT_CPU_WORKERS, fit))
    need_cpu = n * t.cpus_per_worker
    if need_cpu > cap["CPU"]:
        scale = " (autoscaler max included)" if cap["autoscaling"] else ""
        raise ConfigError(f"train.num_workers={n}: needs {need_cpu:g} CPUs ({n} x train.cpus_per_worker="
                          f"{t.cpus_per_worker}) but the cluster can offer at most {cap['CPU']:g}{scale}")
    if use_gpu and n > cap["GPU"]:
        raise ConfigError(f"train.num_workers={n}: needs {n} GPUs but the cluster can offer at most {cap['GPU']:g}")
    if not use_gpu and need_cpu >= cap["CPU"]:
        print(f"[job] warning: {n} workers take all {cap['CPU']:g} CPUs; Ray Data needs a CPU to read "
              "the stream and may stall (lower --num-workers or --cpus-per-worker)", flush=True)
    return n, use_gpu


def steps_per_epoch(chunks_train: int, workers: int, micro: int, accum: int) -> int:
    # Ray Data splits the stream into equal shards; each optimizer step eats
    # micro x accum chunks on every worker.
    return (chunks_train // workers) // (micro * accum)


def plan_steps(cfg: JobConfig, stats: dict[str, Any], workers: int) -> int:
    t = cfg.train
    per_epoch = steps_per_epoch(int(stats["chunks_train"]), workers, t.micro_batch_size, t.gradient_accumulation_steps)
    if per_epoch < 1 and t.max_steps is None:
        raise ConfigError(f"data.corpus: {stats['chunks_train']} training chunks are fewer than one optimizer step "
                          f"({workers} workers x {t.micro_batch_size} micro-batch x {t.gradient_accumulation_steps} "
                          "grad-accum); use a larger corpus or smaller --micro-batch-size")
    if int(stats.get("chunks_valid", 0)) < workers:
        raise ConfigError(f"data.valid_fraction: the validation split has {stats.get('chunks_valid', 0)} chunks, "
                          f"fewer than the {workers} workers that each evaluate a shard of it; raise "
                          "--valid-fraction or give --valid-corpus")
    return t.max_steps or per_epoch * t.num_epochs


# ---- run identity (fresh or --resume) -----------------------------------------------------


def run_identity(cfg: JobConfig, out: Path) -> tuple[str, str]:
    """(run name, storage path). A fresh run gets a new name; --resume reuses the old one,
    and Ray Train then restores its checkpoint manager from storage and hands the workers
    the latest checkpoint."""
    if cfg.train.resume:
        state_file = Path(cfg.train.resume) / RUN_STATE
        if not state_file.is_file():
            raise ConfigError(f"train.resume={cfg.train.resume!r}: no {RUN_STATE} there (not a run folder of this job)")
        state = json.loads(state_file.read_text())
        return state["run_name"], state["storage_path"]
    storage = cfg.train.storage_path or str(out / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return f"train_{time.strftime('%Y%m%d_%H%M%S')}", storage


# ---- the job -------------------------------------------------------------------------------


def run_job(cfg: JobConfig, prepared: Optional[Any] = None) -> dict[str, Any]:
    """Data stage -> TorchTrainer(HF Trainer + DeepSpeed) -> OUTPUT/model + run.json."""
    t0 = time.time()
    t = cfg.train
    if t.resume and Path(t.resume).resolve() != Path(cfg.output).resolve():
        print(f"[job] --resume {t.resume}: continuing in that folder (output={t.resume})", flush=True)
        cfg.output = t.resume
    out = Path(cfg.output).expanduser().resolve()
    ds_config = load_deepspeed_config(t.deepspeed_config)
    check_schedule(cfg)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.export import export_model, pick_checkpoint, smoke_generate, summarize, write_json
    from training.metrics import plot_loss, read_metrics, start_sink
    from training.model import count_parameters, gpt2_config
    from training.ray_utils import init_ray
    from training.tokenizer import load_tokenizer
    from training.train_loop import train_func

    init_ray()
    cap = cluster_capacity()
    workers, use_gpu = plan_workers(cfg, cap)
    precision = resolve_precision(t.precision, use_gpu)
    print(f"[job] cluster: {cap['CPU_now']:g} CPUs, {cap['GPU_now']:g} GPUs now (max {cap['CPU']:g}/{cap['GPU']:g}); "
          f"training on {workers} {'GPU' if use_gpu else 'CPU'} workers, {precision}, "
          f"ZeRO stage {ds_config.get('zero_optimization', {}).get('stage', 0)}", flush=True)

    if prepared is None:
        from training.data.pipeline import prepare_data

        prepared = prepare_data(cfg)
    max_steps = plan_steps(cfg, prepared.stats, workers)
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    model_config = gpt2_config(cfg.model, cfg.data, tokenizer)
    tokens_per_step = workers * t.micro_batch_size * t.gradient_accumulation_steps * cfg.data.context_length

    run_name, storage = run_identity(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_STATE, {"run_name": run_name, "storage_path": storage, "max_steps": max_steps,
                                 "workers": workers, "config": cfg.to_dict()})
    sink = start_sink(out / "metrics.jsonl")

    from transformers import GPT2LMHeadModel

    n_params = count_parameters(GPT2LMHeadModel(model_config))
    print(f"[job] model: GPT-2 {cfg.model.n_layer}x{cfg.model.n_embd}, {n_params / 1e6:.2f} M parameters, "
          f"vocab {model_config.vocab_size}; {prepared.stats['chunks_train']:,} train chunks -> {max_steps} steps of "
          f"{tokens_per_step:,} tokens; run {run_name} in {storage}", flush=True)

    fail_at = os.environ.get("CODECOMPLETE_FAIL_AT_STEP")  # test-only failure injector
    loop_config = {
        "train": asdict(t),
        "model_config": model_config.to_dict(),
        "context_length": cfg.data.context_length,
        "deepspeed": ds_config,
        "precision": precision,
        "use_gpu": use_gpu,
        "max_steps": max_steps,
        "sink": sink,
        "fail_at_step": int(fail_at) if fail_at else None,
        "fail_marker": str(out / "failure_injected.txt") if fail_at else None,
    }
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        # Blocks in a seeded random order, then each worker's shuffle buffer (train_loop).
        datasets={"train": ray.data.read_parquet(str(prepared.train_dir)).randomize_block_order(seed=t.seed),
                  "valid": ray.data.read_parquet(str(prepared.valid_dir))},
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                               checkpoint_score_attribute="eval_loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception:
        print(f"[job] training failed after {t.max_failures} restart(s); its checkpoints are kept: continue with "
              f"`python training/run.py --resume {out}` (plus the same flags)", flush=True)
        raise

    checkpoint, ck_metrics = pick_checkpoint(result)
    model_dir = export_model(checkpoint, prepared.tokenizer_dir, out / "model",
                             fim_rate=cfg.data.fim_rate, fim_spm_rate=cfg.data.fim_spm_rate)
    sample = smoke_generate(model_dir)
    events = read_metrics(out / "metrics.jsonl")
    plot_loss(events, out / "loss.png", title=f"{cfg.preset}: {workers} workers, ZeRO-2")
    summary = summarize(
        events, workers=workers, device="gpu" if use_gpu else "cpu",
        zero_stage=int(ds_config.get("zero_optimization", {}).get("stage", 0)),
        max_steps=max_steps, tokens_per_step=tokens_per_step, wall_s=time.time() - t0,
        exported={"checkpoint": checkpoint.path, "step": ck_metrics.get("step"),
                  "eval_loss": ck_metrics.get("eval_loss"), "sample": sample})
    summary.update({"precision": precision, "parameters": n_params, "run_name": run_name, "storage_path": storage})
    write_json(out / "run.json", summary)
    print(f"[job] done in {summary['wall_time_s']:.0f}s: {summary['steps']} steps, train loss "
          f"{summary['final_train_loss']}, eval loss {summary['final_eval_loss']}, "
          f"{summary['tokens_per_s']} tok/s -> {model_dir}", flush=True)
    print(f"[job] sample: {sample!r}", flush=True)
    return summary
