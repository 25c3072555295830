"""The per-worker function: Hugging Face `Trainer` + DeepSpeed ZeRO-2 on a Ray Data shard.

Ray Train runs `train_func` once in every worker process. Each worker builds the same
GPT-2 from the same seed, reads its own shard of the Ray Data stream
(`get_dataset_shard` + `iter_torch_batches`) and lets DeepSpeed reduce the gradients.

Two facts about CPU workers shape this file (STACK-NOTES):
- Without CUDA, accelerate believes every rank is "process 0 of 1": HF's own losses are
  then rank-local and every rank thinks it should log and save. So losses are averaged
  over ranks here (`RankAwareTrainer.log`), files are written by rank 0 only, and each
  rank saves its Hugging Face checkpoint in a private temporary folder.
- Ray Train merges the files that all ranks report for one checkpoint into one folder,
  so each rank hands over only the files it owns (`owned_by`): its own ZeRO optimizer
  shard, and rank 0 everything shared. No file is written by two ranks.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_state_|bf16_zero_pp_rank_)(\d+)")


def owned_by(rel_path: str) -> int:
    """The rank that uploads this checkpoint file: the rank in its name, else rank 0."""
    m = RANK_FILE.search(Path(rel_path).name)
    return int(m.group(1)) if m else 0


def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Parquet list<int32> columns -> int64 [batch, context] tensors (labels included:
    prepare_trainer skips Trainer's data collator, so the batch must be complete)."""
    out = {}
    for key in ("input_ids", "labels"):
        col = batch[key]
        arr = np.stack(list(col)) if col.dtype == object else np.asarray(col)
        out[key] = torch.as_tensor(arr.astype(np.int64))
    return out


def cached_batches(stream: Any) -> Any:
    """The validation shard, read from Ray Data once and replayed from memory afterwards.

    Every evaluation would otherwise start a new Ray Data execution of the split (about
    10 s of coordination on 2 cores for a few dozen rows). The validation split is small
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


def param_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order: equal digests = equal weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_func(config: dict[str, Any]) -> None:
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.training_args import ParallelMode

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = config["train"]
    sink = config.get("sink")
    max_steps = int(config["max_steps"])
    tokens_per_step = world * t["micro_batch_size"] * t["gradient_accumulation_steps"] * config["context_length"]

    def emit(event: dict[str, Any]) -> None:
        if sink is not None:
            sink.log.remote(event)

    class RankAwareTrainer(Trainer):
        def evaluation_loop(self, *a, **kw):
            import torch.distributed as dist
            from transformers.trainer_pt_utils import distributed_concat

            if world > 1 and dist.is_initialized() and self.accelerator.num_processes != world:
                # accelerate counts 1 process on CPU and would all_gather into a list of 1
                # (gloo rejects it): gather the per-batch losses over the real world instead.
                self.gather_function = distributed_concat
            return super().evaluation_loop(*a, **kw)

        def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
            import torch.distributed as dist

            if world > 1 and dist.is_initialized() and self.args.parallel_mode != ParallelMode.DISTRIBUTED:
                # HF computed these on this rank alone; all ranks log at the same steps,
                # and the shards are equal-sized, so the plain mean is the global mean.
                keys = [k for k in ("loss", "eval_loss") if k in logs]
                if keys:
                    vals = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64)
                    dist.all_reduce(vals)
                    for k, v in zip(keys, (vals / world).tolist()):
                        logs[k] = v
            if "eval_loss" in logs:
                logs["eval_perplexity"] = math.exp(min(float(logs["eval_loss"]), 50.0))
            super().log(logs, start_time)

    class RankAwareReportCallback(RayTrainReportCallback):
        """RayTrainReportCallback, but each rank reports only the files it owns."""

        def on_save(self, args, state, control, **kwargs):
            import transformers.trainer

            metrics: dict[str, Any] = {}
            for entry in state.log_history:
                metrics.update(entry)
            metrics["step"] = state.global_step
            src = transformers.trainer.get_last_checkpoint(args.output_dir)
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if src is not None:
                    dst = Path(tmp, self.CHECKPOINT_NAME)
                    for f in Path(src).rglob("*"):
                        rel = f.relative_to(src).as_posix()
                        if f.is_file() and owned_by(rel) == rank:
                            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(f, dst / rel)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics=metrics, checkpoint=checkpoint)  # every rank reports

    class ProgressCallback(TrainerCallback):
        """Progress line + metrics events (rank 0), digests (all ranks), failure injection."""

        def __init__(self) -> None:
            from training.metrics import Throughput

            self.Throughput = Throughput
            self.meter = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.meter = self.Throughput(state.global_step, max_steps, tokens_per_step)
            emit({"event": "param_digest", "phase": "begin", "rank": rank, "step": state.global_step,
                  "digest": param_digest(model)})
            if rank == 0:
                emit({"event": "attempt_start", "start_step": state.global_step, "max_steps": max_steps,
                      "world_size": world})
                print(f"[train] rank 0 of {world}: starting at step {state.global_step}/{max_steps}, "
                      f"{tokens_per_step:,} tokens per step", flush=True)

        def on_step_end(self, args, state, control, **kwargs):
            self.meter.step_done(state.global_step)
            fail_at, marker = config.get("fail_at_step"), config.get("fail_marker")
            if fail_at and marker and rank == world - 1 and state.global_step == fail_at and not os.path.exists(marker):
                # Test-only failure injector: a real process death, once (the marker).
                Path(marker).write_text(f"killed rank {rank} at step {state.global_step}\n")
                print(f"[train] FAILURE INJECTION: rank {rank} exits at step {state.global_step}", flush=True)
                os._exit(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if rank != 0 or not logs:
                return
            tps = self.meter.tokens_per_s(state.global_step)
            eta = self.meter.eta_s(state.global_step)
            emit({"event": "log", "step": state.global_step, "tokens_per_s": round(tps, 1), **logs})
            print(self._line(state.global_step, logs, tps, eta), flush=True)

        def _line(self, step, logs, tps, eta):
            from training.metrics import progress_line

            return progress_line(step, max_steps, logs, tps, eta)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            emit({"event": "param_digest", "phase": "end", "rank": rank, "step": state.global_step,
                  "digest": param_digest(model)})
            if rank == 0:
                steps = state.global_step - self.meter.start_step
                emit({"event": "attempt_end", "start_step": self.meter.start_step, "step": state.global_step,
                      "seconds": round(self.meter.elapsed(), 3), "tokens": steps * tokens_per_step,
                      "steady_tokens_per_s": self.meter.steady_tokens_per_s()})

    if not config.get("use_gpu"):
        # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op under a lock file in
        # ~/.cache/torch_extensions. A process killed mid-build leaves that lock behind and every
        # later job on the machine waits on it forever (seen here); jobs sharing a machine can
        # also meet in its shared memory. gloo's all-reduce is plenty for these model sizes.
        import deepspeed.comm.torch as ds_torch_comm

        ds_torch_comm.build_shm_op = lambda: None

    torch.manual_seed(t["seed"])  # every rank builds the same initial weights
    model = GPT2LMHeadModel(GPT2Config.from_dict(config["model_config"]))

    precision = config["precision"]
    out_dir = tempfile.mkdtemp(prefix=f"hf_rank{rank}_")  # private: HF thinks each rank is rank 0
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=t["micro_batch_size"],
        per_device_eval_batch_size=t["micro_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler_type"],
        warmup_steps=t["warmup_steps"],
        weight_decay=t["weight_decay"],
        max_steps=max_steps,
        eval_strategy="steps",
        eval_steps=t["eval_steps"],
        logging_strategy="steps",
        logging_steps=t["logging_steps"],
        save_strategy="steps",
        save_steps=t["save_steps"],
        save_total_limit=1,  # local scratch only; Ray Train keeps the real checkpoints
        deepspeed=config["deepspeed"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=t["seed"],
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        prediction_loss_only=True,  # eval needs the loss only: nothing else is gathered
        dataloader_pin_memory=bool(config.get("use_gpu")),
    )

    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    batch = t["micro_batch_size"]
    # Chunks arrive in file order; a local shuffle buffer mixes files within each batch
    # (the seed's Trainer shuffles globally). Seeded per rank: reproducible, not identical.
    shuffle = {"local_shuffle_buffer_size": t["shuffle_buffer"],
               "local_shuffle_seed": t["seed"] + rank} if t["shuffle_buffer"] else {}
    trainer = RankAwareTrainer(
        model=model,
        args=args,
        train_dataset=train_shard.iter_torch_batches(batch_size=batch, collate_fn=collate, drop_last=True, **shuffle),
        eval_dataset=cached_batches(valid_shard.iter_torch_batches(batch_size=batch, collate_fn=collate)),
    )
    trainer.remove_callback(PrinterCallback)  # our progress line replaces its raw dicts
    trainer.add_callback(ProgressCallback())
    trainer.add_callback(RankAwareReportCallback())
    trainer = prepare_trainer(trainer)

    checkpoint = ray.train.get_checkpoint()
    try:
        if checkpoint is not None:
            # A restart after a failure, or `--resume`: weights, ZeRO optimizer shards,
            # scheduler and step all come back; HF skips the batches already seen.
            with checkpoint.as_directory() as ckpt_dir:
                trainer.train(resume_from_checkpoint=os.path.join(ckpt_dir, RayTrainReportCallback.CHECKPOINT_NAME))
        else:
            trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
