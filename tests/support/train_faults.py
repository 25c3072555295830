"""Faults and recorders for tests, installed into the real training job's Trainers.

    CODECOMPLETE_TRAIN_PLUGINS=tests.support.train_faults:kill_worker   TRAIN_FAULT_KILL_AT_STEP=5
    CODECOMPLETE_TRAIN_PLUGINS=tests.support.train_faults:skip_reduce   TRAIN_FAULT_SKIP_REDUCE_RANK=1
    CODECOMPLETE_TRAIN_PLUGINS=tests.support.train_faults:record_batches
    CODECOMPLETE_TRAIN_PLUGINS=tests.support.train_faults:pace   TRAIN_FAULT_PACE_S=1 TRAIN_FAULT_PACE_BELOW=2

(training/train/plugins.py runs them in every Ray Train worker.)

- kill_worker: the last rank's process exits at that step, once (a marker file in the run
  folder, `failure_injected.txt`, says it happened and stops the restarted attempt from
  dying again): a real worker death, for the restart and --resume tests. It waits (at most
  60 s) until Ray Train has registered a checkpoint: with asynchronous uploads a save
  becomes one only after its upload.
- skip_reduce: that rank's loss is multiplied by 0, so its gradient is zero and the
  all-reduced gradient is no longer the mean over the union batch: the gradient-averaging
  check must then fail.
- pace: every step of an attempt with fewer than PACE_BELOW workers takes PACE_S seconds
  longer, so that an elastic run shrunk by a lost node is still training when the node
  is back (on a fast machine it could finish first, and there would be nothing to grow).
- record_batches: every rank sends the rows of each micro-batch it draws, in order, as
  `batch` events to OUTPUT/metrics.jsonl, so a test can replay them in one plain process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

ENV_VARS = ("TRAIN_FAULT_KILL_AT_STEP", "TRAIN_FAULT_SKIP_REDUCE_RANK", "TRAIN_FAULT_PACE_S", "TRAIN_FAULT_PACE_BELOW")
MARKER = "failure_injected.txt"


def registered_checkpoints(output: Path) -> int:
    """How many checkpoints Ray Train's checkpoint manager has registered for the run in this
    run folder (its snapshot in the storage; local storage only)."""
    import json

    try:
        run = json.loads((output / "run_state.json").read_text())
        snap = Path(run["storage_path"], run["run_name"], "checkpoint_manager_snapshot.json")
        return len(json.loads(snap.read_text()).get("checkpoint_results", []))
    except (OSError, ValueError, KeyError):
        return 0


class _KillAtStep(TrainerCallback):
    def __init__(self, step: int, marker: Path, rank: int):
        self.step, self.marker, self.rank = step, marker, rank

    def on_step_end(self, args, state, control, **kwargs):
        import time

        if state.global_step == self.step and not self.marker.exists():
            # Uploads are asynchronous: a save is a checkpoint only once uploaded and registered
            # (seconds later). Die once the run has one, so the restart has a checkpoint to
            # start from whatever the machine's load.
            deadline = time.time() + 60
            while registered_checkpoints(self.marker.parent) == 0 and time.time() < deadline:
                time.sleep(0.2)
            self.marker.write_text(f"killed rank {self.rank} at step {state.global_step}\n")
            print(f"[train] FAILURE INJECTION: rank {self.rank} exits at step {state.global_step}", flush=True)
            os._exit(1)


def kill_worker(trainer: Any, context: Any) -> None:
    step = int(context.env.get("TRAIN_FAULT_KILL_AT_STEP", "5"))
    if context.rank == context.world - 1:
        trainer.add_callback(_KillAtStep(step, Path(context.output) / MARKER, context.rank))


def skip_reduce(trainer: Any, context: Any) -> None:
    if context.rank != int(context.env.get("TRAIN_FAULT_SKIP_REDUCE_RANK", "1")):
        return
    compute_loss = trainer.compute_loss

    def zero_loss(model, inputs, *a, **kw):
        loss = compute_loss(model, inputs, *a, **kw)
        return loss * 0.0 if not isinstance(loss, tuple) else (loss[0] * 0.0, *loss[1:])

    trainer.compute_loss = zero_loss


def record_batches(trainer: Any, context: Any) -> None:
    from ray.data.iterator import _IterableFromIterator

    stream = trainer.train_dataset

    def gen():
        for index, batch in enumerate(stream):
            context.emit({"event": "batch", "rank": context.rank, "index": index,
                          "input_ids": batch["input_ids"].tolist()})
            yield batch

    trainer.train_dataset = _IterableFromIterator(gen)


class _Pace(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        import time

        time.sleep(self.seconds)


def pace(trainer: Any, context: Any) -> None:
    if context.world < int(context.env.get("TRAIN_FAULT_PACE_BELOW", "2")):
        trainer.add_callback(_Pace(float(context.env.get("TRAIN_FAULT_PACE_S", "1"))))
