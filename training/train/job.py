"""The driver: check the cluster, run the data stage, train with Ray Train, export.

`python training/run.py` and `ray job submit -- python training/run.py` both end here.
Order matters for bad input: everything that can be checked without training (DeepSpeed
config, cluster size, corpus yield, step count) fails with one line before any worker
starts.

Worker-count rule (documented in docs/training.md): the cluster's capacity is the larger
of what it has now and what its autoscaler may add (the node groups' max counts from the
autoscaler's cluster config). A run is rejected only when num_workers x cpus_per_worker
(or num_workers GPUs) exceeds that capacity, so a head with 0 CPUs that can scale up is
accepted. The default is one worker per GPU on a GPU cluster, else 2 CPU workers with
fractional CPU reservations that leave Ray Data room to read (training/train/plan.py).

Every long stage (data, worker probe, training) runs under a stall watchdog
(training/train/watchdog.py): no progress for --stall-timeout is one error line, never a hang.
Modules named in CODECOMPLETE_TRAIN_PLUGINS (training/train/plugins.py) may add to every
worker's Trainer; the tests inject their faults that way.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from training.config import ConfigError, JobConfig
from training.config.job import load_deepspeed_config
from training.layout import RUN_STATE_FILE, RunLayout
from training.train.plan import check_batch, choose_precision, plan_batch, plan_for_resume, plan_workers
from training.train.plugins import driver_settings as plugin_settings
from training.train.watchdog import StallError, watched

# ---- checks that need no cluster ---------------------------------------------------------


def check_schedule(cfg: JobConfig) -> None:
    t = cfg.train
    if t.save_steps % t.eval_steps != 0:
        raise ConfigError(f"train.save_steps={t.save_steps}: must be a multiple of train.eval_steps="
                          f"{t.eval_steps} (checkpoints are ranked by the eval loss of their step)")


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


def accumulation_line(plan: Any) -> str:
    """How the global batch is made, per world size when elastic."""
    if not plan.elastic:
        return (f"{plan.workers} workers x micro-batch {plan.micro_batch_size} x grad-accum "
                f"{plan.gradient_accumulation_steps}")
    per = ", ".join(f"{w}: {a}" for w, a in sorted(plan.accumulation.items()))
    return f"micro-batch {plan.micro_batch_size} x workers x grad-accum, by workers {{{per}}}"


# ---- run identity (fresh or --resume) -----------------------------------------------------


def saved_state(cfg: JobConfig) -> Optional[dict[str, Any]]:
    """The resumed run's run_state.json (None for a fresh run)."""
    if not cfg.train.resume:
        return None
    state_file = RunLayout(cfg.train.resume).run_state  # the run name + storage that --resume continues
    if not state_file.is_file():
        raise ConfigError(f"train.resume={cfg.train.resume!r}: no {RUN_STATE_FILE} there (not a run folder of this job)")
    return json.loads(state_file.read_text())


def run_identity(cfg: JobConfig, out: RunLayout, state: Optional[dict[str, Any]]) -> tuple[str, str]:
    """(run name, storage path). A fresh run gets a new name; --resume reuses the old one,
    and Ray Train then restores its checkpoint manager from storage and hands the workers
    the latest checkpoint."""
    if state is not None:
        return state["run_name"], state["storage_path"]
    storage = cfg.train.storage_path or str(out.ray_results)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return f"train_{time.strftime('%Y%m%d_%H%M%S')}", storage


# ---- the job -------------------------------------------------------------------------------


def run_job(cfg: JobConfig, prepared: Optional[Any] = None) -> dict[str, Any]:
    """Data stage -> TorchTrainer(HF Trainer + DeepSpeed) -> OUTPUT/model + run.json."""
    t0 = time.time()
    t = cfg.train
    from training import log_noise

    log_noise.configure(cfg.verbose)
    if t.resume and Path(t.resume).resolve() != Path(cfg.output).resolve():
        print(f"[job] --resume {t.resume}: continuing in that folder (output={t.resume})", flush=True)
        cfg.output = t.resume
    out = RunLayout(Path(cfg.output).expanduser().resolve())
    ds_config = load_deepspeed_config(t.deepspeed_config)
    check_schedule(cfg)
    plugins = plugin_settings()  # a plugin that does not load fails the run here
    state = saved_state(cfg)
    if state is not None:
        t.num_workers = plan_for_resume(cfg, state)
    check_batch(cfg)  # an explicit worker count (or range) that cannot keep the global batch: before any data

    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.export.checkpoint import export_model, pick_checkpoint, smoke_generate, summarize, write_json
    from training.train.metrics import plot_loss, read_metrics, start_sink
    from training.train.model import count_parameters, gpt2_config
    from training.train.preflight import check_probes, gpu_probe, probe_workers
    from training.ray_utils import init_ray
    from training.train.streams import chunk_stream
    from training.data.tokenizer import load_tokenizer
    from training.train.tracking import settings as tracking_settings
    from training.train.loop import train_func

    init_ray()
    cap = cluster_capacity()
    plan = plan_workers(cfg, cap)
    shown = f"{plan.min_workers}-{plan.workers} (elastic)" if plan.elastic else str(plan.workers)
    print(f"[job] cluster: {cap['CPU_now']:g} CPUs, {cap['GPU_now']:g} GPUs now (max {cap['CPU']:g}/{cap['GPU']:g}); "
          f"training on {shown} {'GPU' if plan.use_gpu else 'CPU'} workers x {plan.cpus_per_worker:g} CPU, "
          f"stream reads {plan.read_cpus:g} CPU, ZeRO stage {ds_config.get('zero_optimization', {}).get('stage', 0)}",
          flush=True)

    if prepared is None:
        from training.data.pipeline import prepare_data

        prepared = watched("data", t.stall_timeout, lambda: prepare_data(cfg))
    plan = plan_batch(cfg, prepared.stats, plan)
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    model_config = gpt2_config(cfg.model, cfg.data, tokenizer)
    tokens_per_step = plan.global_batch_size * cfg.data.context_length

    run_name, storage = run_identity(cfg, out, state)
    # An elastic run needs only its minimum to start: probing the maximum would wait for nodes
    # that a spot cluster may not get for hours.
    probes = watched("worker probe", t.stall_timeout, lambda: probe_workers(
        plan.min_workers, plan.use_gpu, plan.cpus_per_worker, [str(prepared.train_dir), str(prepared.valid_dir)], storage))
    check_probes(probes, storage, cfg.output)
    print(f"[job] worker probe: {len(probes)} task(s) on node(s) {', '.join(sorted({p['node'] for p in probes}))} "
          f"read the prepared data and the checkpoint storage", flush=True)
    gpus = gpu_probe(probes)
    precision = choose_precision(t.precision, plan.use_gpu, gpus)
    out.root.mkdir(parents=True, exist_ok=True)
    write_json(out.run_state, {"run_name": run_name, "storage_path": storage, "max_steps": plan.max_steps,
                               "workers": plan.workers, "plan": plan.to_dict(), "config": cfg.to_dict()})
    sink = start_sink(out.metrics)

    from transformers import GPT2LMHeadModel

    n_params = count_parameters(GPT2LMHeadModel(model_config))
    print(f"[job] model: GPT-2 {cfg.model.n_layer}x{cfg.model.n_embd}, {n_params / 1e6:.2f} M parameters, "
          f"vocab {model_config.vocab_size}, {precision} on {', '.join(gpus['gpus'] or gpus['cpus']) or 'CPU'}; "
          f"{prepared.stats['chunks_train']:,} train chunks -> {plan.max_steps} steps of {plan.global_batch_size} "
          f"sequences ({accumulation_line(plan)}); run {run_name} in {storage}", flush=True)

    loop_config = {
        "train": asdict(t),
        "model_config": model_config.to_dict(),
        "context_length": cfg.data.context_length,
        "deepspeed": ds_config,
        "precision": precision,
        "use_gpu": plan.use_gpu,
        "max_steps": plan.max_steps,
        "global_batch_size": plan.global_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "run_name": run_name,
        "tracking": tracking_settings(t.report_to, out.root, run_name, f"codecomplete-{cfg.preset}", t.tracking_uri),
        "sink": sink,
        "output": str(out.root),
        "plugins": plugins,
        "verbose": cfg.verbose,
    }
    resources = {"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})}
    log_noise.quiet_data_context()  # the streams' coordinators report at INFO, not in tqdm bars
    seed = t.seed if t.shuffle_buffer else None  # shuffle 0: file order, as the tests need
    streams = {"train": chunk_stream(prepared.train_dir, plan.read_cpus, seed),
               "valid": chunk_stream(prepared.valid_dir, plan.read_cpus)}
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=plan.scaling_workers(), use_gpu=plan.use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=t.resize_interval_s),
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        datasets=streams,
        dataset_config=DataConfig(datasets_to_split="all"),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                               checkpoint_score_attribute="eval_loss",
                                               checkpoint_score_order="min"),
            # A node that dies counts against max_failures; one Ray is told is being preempted
            # against max_preemption_failures (-1: always restart from the latest checkpoint).
            failure_config=FailureConfig(max_failures=t.max_failures,
                                         max_preemption_failures=t.max_preemption_failures,
                                         preemption_grace_s=t.preemption_grace_s),
            logging_config=LoggingConfig(log_level=log_noise.train_log_level()),
        ),
    )
    try:
        result = watched("training", t.stall_timeout, trainer.fit, progress=lambda: ray.get(sink.beats.remote(), timeout=30))
    except StallError:
        raise
    except Exception:
        print(f"[job] training failed after {t.max_failures} restart(s); its checkpoints are kept: continue with "
              f"`python training/run.py --resume {out.root}` (plus the same flags)", flush=True)
        raise

    checkpoint, ck_metrics = pick_checkpoint(result)
    with log_noise.export_output():
        model_dir = export_model(checkpoint, prepared.tokenizer_dir, out.model,
                                 fim_rate=cfg.data.fim_rate, fim_spm_rate=cfg.data.fim_spm_rate)
        sample = smoke_generate(model_dir)
    events = read_metrics(out.metrics)
    plot_loss(events, out.loss_plot, title=f"{cfg.preset}: {plan.workers} workers, ZeRO-2")
    summary = summarize(
        events, workers=plan.workers, device="gpu" if plan.use_gpu else "cpu",
        max_steps=plan.max_steps, tokens_per_step=tokens_per_step, wall_s=time.time() - t0,
        exported={"checkpoint": checkpoint.path, "step": ck_metrics.get("step"),
                  "eval_loss": ck_metrics.get("eval_loss"), "sample": sample})
    summary.update({"precision": precision, "parameters": n_params, "run_name": run_name, "storage_path": storage,
                    "global_batch_size": plan.global_batch_size, "micro_batch_size": plan.micro_batch_size,
                    "gradient_accumulation_steps": plan.gradient_accumulation_steps,
                    "cpus_per_worker": plan.cpus_per_worker, "min_workers": plan.min_workers})
    write_json(out.summary, summary)
    from training.export.model_card import write_model_card

    write_model_card(out.root, model_dir)  # README.md: the folder can be pushed to a hub as is
    print(f"[job] done in {summary['wall_time_s']:.0f}s: {summary['steps']} steps, train loss "
          f"{summary['final_train_loss']}, eval loss {summary['final_eval_loss']}, "
          f"{summary['tokens_per_s']} tok/s -> {model_dir}", flush=True)
    print(f"[job] sample: {sample!r}", flush=True)
    return summary
