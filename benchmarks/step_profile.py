"""Where a training step's time goes: a training plugin (training/train/plugins.py) used by
benchmarks/train.py, for the distributed job's workers and for the course's single process.

Exclusive wall time per part (a part nested in another is not counted twice):
- `data`: waiting for the next batch from Ray Data's iterator (the distributed run), or the
  map-style dataset's item reads and the collator (the single process, whose DataLoader runs
  in the training process);
- `forward`: `Trainer.compute_loss`;
- `backward`: `accelerator.backward`, less what is listed below (under DeepSpeed it also runs
  the engine's gradient bookkeeping and `engine.step()`);
- `comm`: DeepSpeed's collectives (gloo on CPU: the ZeRO-2 gradient reduce-scatter, the
  all-gather of the updated partitions), timed in DeepSpeed's torch backend;
- `optimizer`: torch's optimizer `step()` (AdamW), by torch's global optimizer hooks;
- `callbacks`: the Trainer's callback events (ours and Ray Train's);
- `other`: the rest of the step (Trainer's loop, clipping, scheduler, logging).

Rank 0 emits one `step_profile` event (mean ms per optimizer step over the steady steps:
the first `SKIP` are left out) into metrics.jsonl, or `profile_of(trainer)` is read directly.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional

ENV_VARS = ("BENCH_PIN_CORES",)  # set: each rank's threads pinned to core `rank` (weak scaling)
PARTS = ("data", "forward", "backward", "comm", "optimizer", "callbacks")
SKIP = 2  # warm-up steps left out
COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "reduce", "broadcast",
               "all_reduce_coalesced", "reduce_scatter", "all_gather", "barrier")


class StepTimers:
    """Exclusive time per part, summed per optimizer step."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []  # [part, start, time of children]
        self.current = dict.fromkeys(PARTS, 0.0)
        self.steps: list[dict[str, float]] = []
        self.last_end: Optional[float] = None

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*a: Any, **kw: Any) -> Any:
            if self.stack and self.stack[-1][0] == part:  # re-entrant (a collective calling one)
                return fn(*a, **kw)
            self.stack.append([part, time.perf_counter(), 0.0])
            try:
                return fn(*a, **kw)
            finally:
                name, start, children = self.stack.pop()
                spent = time.perf_counter() - start
                self.current[name] += spent - children
                if self.stack:
                    self.stack[-1][2] += spent

        return timed

    def step_end(self) -> None:
        now = time.perf_counter()
        if self.last_end is not None:
            wall = now - self.last_end
            self.steps.append({**self.current, "step": wall,
                               "other": max(0.0, wall - sum(self.current.values()))})
        self.current = dict.fromkeys(PARTS, 0.0)
        self.last_end = now

    def summary(self) -> Optional[dict[str, float]]:
        steady = self.steps[SKIP:] or self.steps
        if not steady:
            return None
        keys = ("step", *PARTS, "other")
        out = {f"{k}_ms": round(1000 * sum(s[k] for s in steady) / len(steady), 2) for k in keys}
        out["steps"] = len(steady)
        return out


def timed_iterable(iterable: Any, timers: StepTimers) -> Any:
    """The train stream with the wait for each batch timed, still a Ray iterable (so that
    prepare_trainer feeds it to the Trainer as before)."""
    from ray.data.iterator import _IterableFromIterator

    def gen():
        it = iter(iterable)
        nxt = timers.wrap("data", lambda: next(it))
        while True:
            try:
                yield nxt()
            except StopIteration:
                return

    return _IterableFromIterator(gen)


def _patch_deepspeed_comm(timers: StepTimers) -> None:
    try:
        import importlib

        backend = importlib.import_module("deepspeed.comm.torch").TorchBackend
    except ImportError:
        return
    for name in COLLECTIVES:
        fn = getattr(backend, name, None)
        if fn is not None and not getattr(fn, "_step_profiled", False):
            wrapped = timers.wrap("comm", fn)
            wrapped._step_profiled = True  # type: ignore[attr-defined]
            setattr(backend, name, wrapped)


def attach(trainer: Any, ray_stream: bool = True) -> StepTimers:
    """Time the parts of every step of `trainer` (before trainer.train())."""
    from transformers import TrainerCallback

    timers = StepTimers()
    trainer._step_timers = timers
    trainer.compute_loss = timers.wrap("forward", trainer.compute_loss)
    trainer.accelerator.backward = timers.wrap("backward", trainer.accelerator.backward)
    handler = trainer.callback_handler
    handler.call_event = timers.wrap("callbacks", handler.call_event)
    _patch_deepspeed_comm(timers)
    opt_start: dict[int, float] = {}

    def pre(opt, args, kwargs):
        timers.stack.append(["optimizer", time.perf_counter(), 0.0])

    def post(opt, args, kwargs):
        name, start, children = timers.stack.pop()
        spent = time.perf_counter() - start
        timers.current["optimizer"] += spent - children
        if timers.stack:
            timers.stack[-1][2] += spent

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    hooks = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    del opt_start
    if ray_stream:
        trainer.train_dataset = timed_iterable(trainer.train_dataset, timers)
    else:  # a map-style dataset in this process: its item reads and the collator are the wait
        cls = type(trainer.train_dataset)
        cls.__getitem__ = timers.wrap("data", cls.__getitem__)
        trainer.data_collator = timers.wrap("data", trainer.data_collator)

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            timers.step_end()

        def on_train_end(self, args, state, control, **kw):
            for h in hooks:  # torch's optimizer hooks are global: gone with this run
                h.remove()

    trainer.add_callback(StepEnd())
    return timers


def install(trainer: Any, context: Any) -> Any:
    """Plugin entry (CODECOMPLETE_TRAIN_PLUGINS=step_profile): rank 0 emits its profile."""
    import os

    import torch
    from transformers import TrainerCallback

    if context.env.get("BENCH_PIN_CORES"):
        os.sched_setaffinity(0, {context.rank % (os.cpu_count() or 1)})
        torch.set_num_threads(1)
    timers = attach(trainer)

    class Emit(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):
            if context.rank == 0:
                context.emit({"event": "step_profile", "rank": 0, **(timers.summary() or {})})

    trainer.add_callback(Emit())
    return trainer
