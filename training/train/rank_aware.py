"""Hugging Face's Trainer and callbacks, made aware of the Ray Train ranks.

On CPU workers accelerate sees every rank as "process 0 of 1" (docs/training.md, "What the
job relies on"). These classes put the real world back where it matters: losses averaged
and eval losses gathered over all ranks, each rank reporting only the checkpoint files it
owns and deleting its scratch copy, rank 0 sending the progress events, every rank sending
heartbeats for the driver's stall watchdog.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import ray.train
import torch
from ray.train.huggingface.transformers import RayTrainReportCallback
from transformers import Trainer, TrainerCallback
from transformers.training_args import ParallelMode

BEAT_EVERY_S = 2.0  # at most one heartbeat per this many seconds per rank
RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_state_|bf16_zero_pp_rank_)(\d+)")


def owned_by(rel_path: str) -> int:
    """The rank that uploads this checkpoint file: the rank in its name, else rank 0."""
    m = RANK_FILE.search(Path(rel_path).name)
    return int(m.group(1)) if m else 0


def param_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order: equal digests = equal weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


class RankAwareTrainer(Trainer):
    """HF Trainer whose logged losses and eval gather span all Ray Train ranks."""

    def __init__(self, *a: Any, world: int = 1, **kw: Any):
        super().__init__(*a, **kw)
        self.world = world

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
    """RayTrainReportCallback, but each rank reports only the files it owns, and uploads in
    the background (Ray Train's CheckpointUploadMode.ASYNC, which HF's own callback never
    asks for): the rank moves its files out of HF's scratch folder into a staging folder of
    its own, reports it and trains on while Ray Train copies it to storage and then deletes
    it. `asynchronous=False` blocks in report until the copy is done, as HF's callback does."""

    def __init__(self, rank: int, sink: Any = None, asynchronous: bool = True, staging_prefix: str = "upload_",
                 summary: Any = None):
        super().__init__()
        self.rank, self.sink, self.asynchronous = rank, sink, asynchronous
        self.staging_prefix = staging_prefix
        self.summary = summary  # () -> the optimizer state's sums, logged with each save

    def on_save(self, args, state, control, **kwargs):
        import transformers.trainer
        from ray.train import CheckpointUploadMode

        metrics: dict[str, Any] = {}
        for entry in state.log_history:
            metrics.update(entry)
        metrics["step"] = state.global_step
        src = transformers.trainer.get_last_checkpoint(args.output_dir)
        checkpoint, staging = None, None
        if src is not None:
            # In the temp folder like HF's scratch (same disk: the files are moved, not copied),
            # not inside it: train_func removes that on return, while the last upload may run on.
            staging = tempfile.mkdtemp(prefix=f"{self.staging_prefix}{state.global_step}_")
            dst = Path(staging, self.CHECKPOINT_NAME)
            for f in sorted(Path(src).rglob("*")):
                rel = f.relative_to(src).as_posix()
                if f.is_file() and owned_by(rel) == self.rank:
                    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(f), dst / rel)
            checkpoint = ray.train.Checkpoint.from_directory(staging)
        summary = self.summary() if self.summary is not None else None  # collective: all ranks
        if summary is not None and self.rank == 0 and self.sink is not None:
            self.sink.log.remote({"event": "optimizer_state", "phase": "save", "step": state.global_step, **summary})
        mode = CheckpointUploadMode.ASYNC if self.asynchronous else CheckpointUploadMode.SYNC
        # Every rank reports; Ray Train deletes the staging folder once it is uploaded.
        ray.train.report(metrics=metrics, checkpoint=checkpoint, checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=True)
        if src is not None:
            shutil.rmtree(src, ignore_errors=True)  # what is left of HF's folder: files of other ranks
        left = [p.name for p in Path(args.output_dir).glob("checkpoint-*")]
        if self.sink is not None:  # what stays on this rank's disk: nothing, when cleanup works
            self.sink.log.remote({"event": "scratch", "rank": self.rank, "step": state.global_step, "left": left})


class ProgressCallback(TrainerCallback):
    """Progress line + metrics events (rank 0), digests, stream counts and heartbeats (all ranks)."""

    def __init__(self, config: dict[str, Any], rank: int, world: int, tokens_per_step: int,
                 accumulation: Optional[int] = None):
        from training.train.metrics import Throughput

        self.config, self.rank, self.world = config, rank, world
        self.accumulation = accumulation or int(config.get("gradient_accumulation_steps", 1))
        self.summary: Any = None  # () -> optimizer_state_summary (collective), set by train_func
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
        from training.train.metrics import Throughput, say

        self.meter = Throughput(state.global_step, self.max_steps, self.tokens_per_step)
        self.emit({"event": "param_digest", "phase": "begin", "rank": self.rank, "step": state.global_step,
                   "digest": param_digest(model)})
        summary = self.summary() if self.summary is not None else None  # collective: all ranks
        if summary is not None and self.rank == 0:
            self.emit({"event": "optimizer_state", "phase": "begin", "step": state.global_step, **summary})
        if self.rank == 0:
            engine = getattr(self.trainer, "deepspeed", None) or getattr(self.trainer, "model_wrapped", None)
            stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
            # As the engine that runs says (accelerate calls DeepSpeedEngine.compile() for --compile).
            compiled = bool(getattr(engine, "_is_compiled", False))
            dtype = str(next(model.parameters()).dtype).replace("torch.", "") if model is not None else None
            self.emit({"event": "attempt_start", "start_step": state.global_step, "max_steps": self.max_steps,
                       "world_size": self.world, "gradient_accumulation_steps": self.accumulation,
                       "micro_batch_size": args.per_device_train_batch_size, "zero_stage": stage, "compiled": compiled, "param_dtype": dtype})
            say(f"[train] rank 0 of {self.world}: starting at step {state.global_step}/{self.max_steps}, "
                f"{self.tokens_per_step:,} tokens per step (grad-accum {self.accumulation})")

    def on_substep_end(self, args, state, control, **kwargs):
        self.beat()

    def on_prediction_step(self, args, state, control, **kwargs):
        self.beat()

    def on_step_end(self, args, state, control, **kwargs):
        self.beat()
        self.meter.step_done(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        from training.train.metrics import progress_line, say

        if self.rank != 0 or not logs:
            return
        tps = self.meter.tokens_per_s(state.global_step)
        if "loss" in logs:  # the trackers added after this callback log it with the loss
            logs["tokens_per_s"] = round(tps, 1)
        self.emit({"event": "log", "step": state.global_step, "tokens_per_s": round(tps, 1), **logs})
        say(progress_line(state.global_step, self.max_steps, logs, tps, self.meter.eta_s(state.global_step)))

    def on_batch(self, index: int, batch: dict[str, torch.Tensor]) -> None:
        self.batches_read = index + 1

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
