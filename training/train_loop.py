"""The per-worker function: Hugging Face `Trainer` + DeepSpeed ZeRO-2 on a Ray Data shard.

Ray Train runs `train_func` (at the bottom, read it first) once in every worker process.
Each worker builds the same GPT-2 from the same seed, reads its own shard of the Ray Data
stream (`get_dataset_shard` + `iter_torch_batches`) and lets DeepSpeed reduce the
gradients. The pieces above it exist because of two facts about CPU workers, explained in
docs/training.md ("What the job relies on"):

- Without CUDA, accelerate believes every rank is "process 0 of 1": HF's own losses are
  then rank-local and every rank thinks it should log and save. So losses are averaged
  over ranks here (`RankAwareTrainer.log`), events are sent by rank 0 only, and each rank
  saves its Hugging Face checkpoint in a scratch folder of its own.
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
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.training_args import ParallelMode

RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_state_|bf16_zero_pp_rank_)(\d+)")
BEAT_EVERY_S = 2.0  # at most one heartbeat per this many seconds per rank


def owned_by(rel_path: str) -> int:
    """The rank that uploads this checkpoint file: the rank in its name, else rank 0."""
    m = RANK_FILE.search(Path(rel_path).name)
    return int(m.group(1)) if m else 0


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


def counted(stream: Any, on_batch: Any) -> Any:
    """The stream, calling on_batch(index, batch) for every batch drawn from it: the count of
    batches read (and, in tests, the rows) says what a resumed attempt skipped."""
    from ray.data.iterator import _IterableFromIterator

    def gen():
        for i, b in enumerate(stream):
            on_batch(i, b)
            yield b

    return _IterableFromIterator(gen)


def param_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order: equal digests = equal weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


def scratch_dir(run_name: str, rank: int) -> str:
    """This rank's folder for HF's local checkpoints. A fixed name per run and rank, cleared
    on entry, so an attempt killed before its `finally` leaves nothing behind for long:
    the restarted attempt on that node removes it."""
    d = os.path.join(tempfile.gettempdir(), f"codecomplete_{run_name}_rank{rank}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


# ---- the Trainer and its callbacks -------------------------------------------------------------


class RankAwareTrainer(Trainer):
    """HF Trainer whose logged losses and eval gather span all Ray Train ranks."""

    def __init__(self, *a: Any, world: int = 1, skip_reduce_rank: Optional[int] = None, **kw: Any):
        super().__init__(*a, **kw)
        self.world = world
        self.skip_reduce_rank = skip_reduce_rank

    def compute_loss(self, model, inputs, *a, **kw):
        loss = super().compute_loss(model, inputs, *a, **kw)
        if self.skip_reduce_rank is not None and self.skip_reduce_rank == _rank():
            # Test-only breakage: this rank's gradient becomes zero, so the all-reduced
            # gradient is no longer the mean over the union batch (tests/test_job.py).
            loss = loss * 0.0 if not isinstance(loss, tuple) else (loss[0] * 0.0, *loss[1:])
        return loss

    def evaluation_loop(self, *a, **kw):
        import torch.distributed as dist
        from transformers.trainer_pt_utils import distributed_concat

        if self.world > 1 and dist.is_initialized() and self.accelerator.num_processes != self.world:
            # accelerate counts 1 process on CPU and would all_gather into a list of 1
            # (gloo rejects it): gather the per-batch losses over the real world instead.
            self.gather_function = distributed_concat
        return super().evaluation_loop(*a, **kw)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized() and self.args.parallel_mode != ParallelMode.DISTRIBUTED:
            # HF computed these on this rank alone; all ranks log at the same steps,
            # and the shards are equal-sized, so the plain mean is the global mean.
            keys = [k for k in ("loss", "eval_loss") if k in logs]
            if keys:
                vals = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64)
                dist.all_reduce(vals)
                for k, v in zip(keys, (vals / self.world).tolist()):
                    logs[k] = v
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(float(logs["eval_loss"]), 50.0))
        super().log(logs, start_time)


class RankAwareReportCallback(RayTrainReportCallback):
    """RayTrainReportCallback, but each rank reports only the files it owns and then
    deletes its scratch copy (HF's own cleanup runs only where it thinks it should save)."""

    def __init__(self, rank: int, sink: Any = None):
        super().__init__()
        self.rank, self.sink = rank, sink

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
                    if f.is_file() and owned_by(rel) == self.rank:
                        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, dst / rel)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics=metrics, checkpoint=checkpoint)  # every rank reports
        if src is not None:
            shutil.rmtree(src, ignore_errors=True)  # Ray Train holds it now
        left = [p.name for p in Path(args.output_dir).glob("checkpoint-*")]
        if self.sink is not None:  # what stays on this rank's disk: the tests expect nothing
            self.sink.log.remote({"event": "scratch", "rank": self.rank, "step": state.global_step, "left": left})


class ProgressCallback(TrainerCallback):
    """Progress line + metrics events (rank 0), digests and heartbeats (all ranks),
    test-only failure injection."""

    def __init__(self, config: dict[str, Any], rank: int, world: int, tokens_per_step: int):
        from training.metrics import Throughput

        self.config, self.rank, self.world = config, rank, world
        self.sink = config.get("sink")
        self.max_steps = int(config["max_steps"])
        self.meter = Throughput(0, self.max_steps, tokens_per_step)
        self.tokens_per_step = tokens_per_step
        self._last_beat = 0.0
        self.batches_read = 0  # micro-batches drawn from the training stream by this attempt
        self.trainer: Optional[Trainer] = None  # set by train_func: the engine's ZeRO stage is read from it

    def emit(self, event: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.log.remote(event)

    def beat(self) -> None:
        """Tell the driver's stall watchdog that this rank is moving (rate-limited)."""
        now = time.monotonic()
        if self.sink is not None and now - self._last_beat >= BEAT_EVERY_S:
            self._last_beat = now
            self.sink.beat.remote()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from training.metrics import Throughput, say

        self.meter = Throughput(state.global_step, self.max_steps, self.tokens_per_step)
        self.emit({"event": "param_digest", "phase": "begin", "rank": self.rank, "step": state.global_step,
                   "digest": param_digest(model)})
        if self.rank == 0:
            engine = getattr(self.trainer, "deepspeed", None) or getattr(self.trainer, "model_wrapped", None)
            stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
            self.emit({"event": "attempt_start", "start_step": state.global_step, "max_steps": self.max_steps,
                       "world_size": self.world, "zero_stage": stage})
            say(f"[train] rank 0 of {self.world}: starting at step {state.global_step}/{self.max_steps}, "
                f"{self.tokens_per_step:,} tokens per step")

    def on_substep_end(self, args, state, control, **kwargs):
        self.beat()

    def on_prediction_step(self, args, state, control, **kwargs):
        self.beat()

    def on_step_end(self, args, state, control, **kwargs):
        self.beat()
        self.meter.step_done(state.global_step)
        fail_at, marker = self.config.get("fail_at_step"), self.config.get("fail_marker")
        if fail_at and marker and self.rank == self.world - 1 and state.global_step == fail_at \
                and not os.path.exists(marker):
            from training.metrics import say

            # Test-only failure injector: a real process death, once (the marker).
            Path(marker).write_text(f"killed rank {self.rank} at step {state.global_step}\n")
            say(f"[train] FAILURE INJECTION: rank {self.rank} exits at step {state.global_step}")
            os._exit(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        from training.metrics import progress_line, say

        if self.rank != 0 or not logs:
            return
        tps = self.meter.tokens_per_s(state.global_step)
        if "loss" in logs:  # the trackers added after this callback log it with the loss
            logs["tokens_per_s"] = round(tps, 1)
        self.emit({"event": "log", "step": state.global_step, "tokens_per_s": round(tps, 1), **logs})
        say(progress_line(state.global_step, self.max_steps, logs, tps, self.meter.eta_s(state.global_step)))

    def on_batch(self, index: int, batch: dict[str, torch.Tensor]) -> None:
        self.batches_read = index + 1
        if self.config.get("record_batches"):  # test-only: the rows each rank trained on, in order
            self.emit({"event": "batch", "rank": self.rank, "index": index,
                       "input_ids": batch["input_ids"].tolist()})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.emit({"event": "stream", "rank": self.rank, "step": state.global_step,
                   "batches_read": self.batches_read})
        self.emit({"event": "param_digest", "phase": "end", "rank": self.rank, "step": state.global_step,
                   "digest": param_digest(model)})
        if self.rank == 0:
            steps = state.global_step - self.meter.start_step
            self.emit({"event": "attempt_end", "start_step": self.meter.start_step, "step": state.global_step,
                       "seconds": round(self.meter.elapsed(), 3), "tokens": steps * self.tokens_per_step,
                       "steady_tokens_per_s": self.meter.steady_tokens_per_s()})


class FinalEvalCallback(TrainerCallback):
    """Evaluate (and so checkpoint) at the last step even when it is not a multiple of
    eval_steps: run.json's final eval loss and the exported model are then that step's."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
            control.should_save = True
        return control


# ---- building blocks of train_func -----------------------------------------------------------


def training_arguments(config: dict[str, Any], out_dir: str) -> TrainingArguments:
    t, precision = config["train"], config["precision"]
    return TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=t["micro_batch_size"],
        per_device_eval_batch_size=t["micro_batch_size"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
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
        deepspeed=config["deepspeed"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=t["seed"],
        report_to=[],  # rank 0 adds its tracker itself (training/tracking.py)
        run_name=config.get("run_name"),
        disable_tqdm=True,
        remove_unused_columns=False,
        prediction_loss_only=True,  # eval needs the loss only: nothing else is gathered
    )


def shard_batches(config: dict[str, Any], rank: int, on_batch: Any) -> tuple[Any, Any]:
    """This worker's training and validation batches from its Ray Data shards.

    Pinned host memory on GPUs (the Trainer's own `dataloader_pin_memory` never sees these
    iterables under prepare_trainer). Chunks arrive in file order; a local shuffle buffer
    mixes files within each batch (the seed's Trainer shuffles globally), seeded per rank:
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
    also meet in its shared memory. gloo's all-reduce is plenty for these model sizes."""
    import deepspeed.comm.torch as ds_torch_comm

    ds_torch_comm.build_shm_op = lambda: None


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---- the loop every worker runs -------------------------------------------------------------


def train_func(config: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tokens_per_step = int(config["global_batch_size"]) * config["context_length"]
    if config.get("sink") is not None:
        config["sink"].beat.remote()  # the worker group is up
    if not config.get("use_gpu"):
        skip_deepspeed_shm_op()

    # 1. The same initial weights on every rank.
    torch.manual_seed(config["train"]["seed"])
    model = GPT2LMHeadModel(GPT2Config.from_dict(config["model_config"]))

    # 2. HF Trainer over this worker's shard, logging and checkpointing through Ray Train.
    out_dir = scratch_dir(config["run_name"], rank)  # private: HF thinks each rank is rank 0
    progress = ProgressCallback(config, rank, world, tokens_per_step)
    train_batches, valid_batches = shard_batches(config, rank, progress.on_batch)
    trainer = RankAwareTrainer(model=model, args=training_arguments(config, out_dir),
                               train_dataset=train_batches, eval_dataset=valid_batches,
                               world=world, skip_reduce_rank=config.get("skip_reduce_rank"))
    trainer.remove_callback(PrinterCallback)  # our progress line replaces its raw dicts
    trainer.add_callback(progress)
    if rank == 0:  # TensorBoard / MLflow through HF's own callback (training/tracking.py)
        from training.tracking import callback as tracking_callback

        tracker = tracking_callback(config.get("tracking"))
        if tracker is not None:
            trainer.add_callback(tracker)  # after `progress`, so it sees tokens/s in the logs
    trainer.add_callback(FinalEvalCallback())
    trainer.add_callback(RankAwareReportCallback(rank, config.get("sink")))
    trainer = prepare_trainer(trainer)
    progress.trainer = trainer

    # 3. Train, from the latest checkpoint after a restart or with --resume: weights, ZeRO
    #    optimizer shards, scheduler and step all come back; HF skips the batches already seen.
    checkpoint = ray.train.get_checkpoint()
    try:
        if checkpoint is not None:
            with checkpoint.as_directory() as ckpt_dir:
                trainer.train(resume_from_checkpoint=os.path.join(ckpt_dir, RayTrainReportCallback.CHECKPOINT_NAME))
        else:
            trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
