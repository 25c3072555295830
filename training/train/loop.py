"""The per-worker function: Hugging Face `Trainer` + DeepSpeed ZeRO-2 on a Ray Data shard.

Ray Train runs `train_func` (at the bottom, read it first) once in every worker process.
Each worker builds the same GPT-2 from the same seed, reads its own shard of the Ray Data
stream (`get_dataset_shard` + `iter_torch_batches`) and lets DeepSpeed reduce the
gradients. The pieces above it exist because of two facts about CPU workers, explained in
docs/training.md ("What the job relies on"), and are handled by the Trainer subclass and
callbacks in training/train/rank_aware.py:

- Without CUDA, accelerate believes every rank is "process 0 of 1": HF's own losses are
  then rank-local and every rank thinks it should log and save. So losses are averaged
  over ranks here (`RankAwareTrainer.log`), events are sent by rank 0 only, and each rank
  saves its Hugging Face checkpoint in a scratch folder of its own.
- Ray Train merges the files that all ranks report for one checkpoint into one folder,
  so each rank hands over only the files it owns (`owned_by`): its own ZeRO optimizer
  shard, and rank 0 everything shared. No file is written by two ranks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import nullcontext
from typing import Any, Optional

import numpy as np
import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from training.train.elastic import (optimizer_state_summary, saved_world_size, stale_uploads, universal_checkpoint,
                                    upload_prefix, use_universal_checkpoint)
from training.train.plan import accumulation_steps
from training.train.plugins import PluginContext, install_plugins
from training.train.rank_aware import (FinalEvalCallback, ProgressCallback, RankAwareReportCallback, RankAwareTrainer,
                                       owned_by, param_digest)

__all__ = ["train_func", "owned_by", "param_digest", "collate", "cached_batches", "scratch_dir"]


class TokenCollate(NumpyBatchCollateFn):
    """Parquet list<int32> columns -> int64 [batch, context] tensors (labels included:
    prepare_trainer skips Trainer's data collator, so the batch must be complete)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for key in ("input_ids", "labels"):
            col = batch[key]
            arr = np.stack(list(col)) if col.dtype == object else np.asarray(col)
            out[key] = torch.as_tensor(arr.astype(np.int64))
        return out


collate = TokenCollate()


def cached_batches(stream: Any) -> Any:
    """The validation shard, read from Ray Data once and replayed from memory afterwards.

    Every evaluation would otherwise start a new Ray Data execution of the split, seconds of
    coordination for a few dozen rows. The validation split is small
    (a few % of the corpus), so keeping its batches is cheap. Wrapped in Ray's own
    iterable type so that `prepare_trainer` feeds it to Trainer unchanged."""
    from ray.data.iterator import _IterableFromIterator

    cache: list[dict[str, torch.Tensor]] = []
    state = {"complete": False}

    def gen():
        if state["complete"]:
            yield from cache
            return
        cache.clear()
        for b in stream:
            cache.append(b)
            yield b
        state["complete"] = True

    return _IterableFromIterator(gen)


def counted(stream: Any, on_batch: Any) -> Any:
    """The stream, calling on_batch(index, batch) for every batch drawn from it: the count of
    batches read says what a resumed attempt skipped."""
    from ray.data.iterator import _IterableFromIterator

    def gen():
        for i, b in enumerate(stream):
            on_batch(i, b)
            yield b

    return _IterableFromIterator(gen)


def scratch_dir(run_name: str, rank: int) -> str:
    """This rank's folder for HF's local checkpoints. A fixed name per run and rank, cleared
    on entry, so an attempt killed before its `finally` leaves nothing behind for long:
    the restarted attempt on that node removes it."""
    d = os.path.join(tempfile.gettempdir(), f"codecomplete_{run_name}_rank{rank}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


# ---- building blocks of train_func -----------------------------------------------------------


def training_arguments(config: dict[str, Any], out_dir: str, accumulation: Optional[int] = None,
                       universal: bool = False) -> TrainingArguments:
    """accumulation: this attempt's (derived from its world size; the plan's by default);
    universal: load the resumed checkpoint in DeepSpeed's universal format (training/train/elastic.py)."""
    t, precision = config["train"], config["precision"]
    ds_config = use_universal_checkpoint(config["deepspeed"]) if universal else config["deepspeed"]
    # bf16 on CPU workers: transformers refuses bf16=True without a CUDA bf16 device unless
    # use_cpu=True, and use_cpu=True makes accelerate skip DeepSpeed. DeepSpeed runs bf16 on
    # CPUs itself, so the arguments are built fp32 and switched to bf16 after that check.
    cpu_bf16 = precision == "bf16" and not config.get("use_gpu")
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=t["micro_batch_size"],
        per_device_eval_batch_size=t["micro_batch_size"],
        gradient_accumulation_steps=accumulation or config["gradient_accumulation_steps"],
        learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler_type"],
        warmup_steps=t["warmup_steps"],
        weight_decay=t["weight_decay"],
        max_steps=int(config["max_steps"]),
        eval_strategy="steps",
        eval_steps=t["eval_steps"],
        logging_strategy="steps",
        logging_steps=t["logging_steps"],
        save_strategy="steps",
        save_steps=t["save_steps"],
        save_total_limit=1,  # local scratch only; Ray Train keeps the real checkpoints
        deepspeed=ds_config,
        bf16=precision == "bf16" and not cpu_bf16,
        fp16=precision == "fp16",
        torch_compile=bool(t.get("compile")),  # accelerate calls DeepSpeedEngine.compile()
        seed=t["seed"],
        report_to=[],  # rank 0 adds its tracker itself (training/train/tracking.py)
        run_name=config.get("run_name"),
        disable_tqdm=True,
        remove_unused_columns=False,
        prediction_loss_only=True,  # eval needs the loss only: nothing else is gathered
    )
    if cpu_bf16:
        args.bf16 = True
        ds = args.hf_deepspeed_config
        ds.config["bf16"] = {**ds.config.get("bf16", {}), "enabled": True}
        ds._dtype = torch.bfloat16
    return args


def shard_batches(config: dict[str, Any], rank: int, on_batch: Any) -> tuple[Any, Any]:
    """This worker's training and validation batches from its Ray Data shards.

    Pinned host memory on GPUs (the Trainer's own `dataloader_pin_memory` never sees these
    iterables under prepare_trainer). Chunks arrive in file order; a local shuffle buffer
    mixes files within each batch (the course recipe's Trainer shuffles globally), seeded per rank:
    reproducible, not identical."""
    t = config["train"]
    pin = bool(config.get("use_gpu"))
    shuffle = {"local_shuffle_buffer_size": t["shuffle_buffer"],
               "local_shuffle_seed": t["seed"] + rank} if t["shuffle_buffer"] else {}
    train = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=t["micro_batch_size"], collate_fn=collate, drop_last=True, pin_memory=pin, **shuffle)
    valid = ray.train.get_dataset_shard("valid").iter_torch_batches(
        batch_size=t["micro_batch_size"], collate_fn=collate, pin_memory=pin)
    return counted(train, on_batch), cached_batches(valid)


def skip_deepspeed_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op under a lock file in
    ~/.cache/torch_extensions. A process killed mid-build leaves that lock behind and every
    later job on the machine waits on it forever (seen here); jobs sharing a machine can
    also meet in its shared memory. gloo's all-reduce is plenty for these model sizes.

    By import_module: `import deepspeed.comm.torch as m` binds `deepspeed.comm`'s attribute
    `torch`, which is the torch package, so the patch would miss the module that calls it."""
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def resume_point(checkpoint_dir: Optional[str], world: int, work_dir: str) -> tuple[Optional[str], bool]:
    """(HF checkpoint folder to resume from, whether it is a universal conversion). A checkpoint
    whose ZeRO shards were written by another world size is converted (training/train/elastic.py)."""
    if checkpoint_dir is None:
        return None, False
    hf = os.path.join(checkpoint_dir, RayTrainReportCallback.CHECKPOINT_NAME)
    saved = saved_world_size(hf)
    if saved is None or saved == world:
        return hf, False
    print(f"[train] checkpoint written by {saved} workers, resuming on {world}: re-sharding the ZeRO-2 optimizer "
          "state through DeepSpeed's universal checkpoint", flush=True)
    return universal_checkpoint(hf, os.path.join(work_dir, "universal")), True


def build_trainer(config: dict[str, Any], model: Any, rank: int, world: int, tokens_per_step: int,
                  accumulation: int, universal: bool, out_dir: str) -> Any:
    """HF Trainer over this worker's shard, logging and checkpointing through Ray Train."""
    progress = ProgressCallback(config, rank, world, tokens_per_step, accumulation)
    train_batches, valid_batches = shard_batches(config, rank, progress.on_batch)
    trainer = RankAwareTrainer(model=model, args=training_arguments(config, out_dir, accumulation, universal),
                               train_dataset=train_batches, eval_dataset=valid_batches, world=world)
    trainer.remove_callback(PrinterCallback)  # our progress line replaces its raw dicts
    trainer.add_callback(progress)
    if rank == 0:  # TensorBoard / MLflow through HF's own callback (training/train/tracking.py)
        from training.train.tracking import callback as tracking_callback

        tracker = tracking_callback(config.get("tracking"))
        if tracker is not None:
            trainer.add_callback(tracker)  # after `progress`, so it sees tokens/s in the logs
    trainer.add_callback(FinalEvalCallback())

    def summary() -> Any:
        return optimizer_state_summary(trainer.model_wrapped, world)

    progress.summary = summary
    trainer.add_callback(RankAwareReportCallback(rank, config.get("sink"),
                                                 asynchronous=bool(config["train"].get("async_checkpoint", True)),
                                                 staging_prefix=upload_prefix(config["run_name"], rank),
                                                 summary=summary))
    trainer = prepare_trainer(trainer)
    # Modules named in CODECOMPLETE_TRAIN_PLUGINS may add callbacks or wrap the trainer.
    trainer = install_plugins(trainer, config.get("plugins"), PluginContext(
        rank=rank, world=world, output=config.get("output", ""), sink=config.get("sink")))
    progress.trainer = trainer
    return trainer


# ---- the loop every worker runs -------------------------------------------------------------


def train_func(config: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tokens_per_step = int(config["global_batch_size"]) * config["context_length"]
    # Elastic runs: this attempt's world size decides the accumulation that keeps the global
    # batch (the plan refused ranges with a size that cannot).
    accumulation = accumulation_steps(int(config["global_batch_size"]), config["train"]["micro_batch_size"], world)
    if config.get("sink") is not None:
        config["sink"].beat.remote()  # the worker group is up
    from training import log_noise

    log_noise.worker_setup(bool(config.get("verbose")), bool(config.get("use_gpu")))  # before DeepSpeed loads
    if not config.get("use_gpu"):
        skip_deepspeed_shm_op()
        from training.train.cpu_features import pin_to_core

        pin_to_core(ctx.get_local_rank(), ctx.get_local_world_size())  # its own core, if each worker has one

    # 1. The same initial weights on every rank.
    torch.manual_seed(config["train"]["seed"])
    model = GPT2LMHeadModel(GPT2Config.from_dict(config["model_config"]))
    # GPT2LMHeadModel's class name does not end in ForCausalLM, so transformers 5 warns that
    # it guesses ForCausalLM's loss: that loss, named.
    model.loss_type = "ForCausalLM"

    out_dir = scratch_dir(config["run_name"], rank)  # private: HF thinks each rank is rank 0
    for stale in stale_uploads(config["run_name"], rank):  # an earlier attempt here died mid-upload
        shutil.rmtree(stale, ignore_errors=True)
    # 2. The latest checkpoint after a restart (or with --resume): weights, ZeRO optimizer
    #    shards, scheduler and step all come back; HF skips the batches already seen.
    checkpoint = ray.train.get_checkpoint()
    try:
        with (checkpoint.as_directory() if checkpoint is not None else nullcontext(None)) as ckpt_dir:
            resume, universal = resume_point(ckpt_dir, world, out_dir)
            trainer = build_trainer(config, model, rank, world, tokens_per_step, accumulation, universal,
                                    os.path.join(out_dir, "hf"))
            trainer.train(resume_from_checkpoint=resume)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
