"""What a person (and the tests) can follow: metrics.jsonl, the progress line, loss.png.

The training workers may run on other nodes than the driver, so they do not write the
run's files themselves: rank 0 (and, for parameter digests, every rank) sends each event
to one small `MetricsSink` actor pinned to the driver's node, and that actor is the only
writer of `OUTPUT/metrics.jsonl`. One writer per file, wherever the workers live.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import ray


class MetricsLog:
    """Append-only JSON-lines file: one line per log event, flushed at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: dict[str, Any]) -> None:
        event = {"time": round(time.time(), 3), **event}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(event, default=float) + "\n")


@ray.remote(num_cpus=0)
class MetricsSink:
    """The single writer of metrics.jsonl; the workers call `log.remote(event)`."""

    def __init__(self, path: str):
        self._log = MetricsLog(path)
        self._beats = 0

    def log(self, event: dict[str, Any]) -> None:
        self._log.write(event)
        self._beats += 1

    def beat(self) -> None:
        """A worker made progress (a micro-batch, a step, an eval batch): the stall watchdog's signal."""
        self._beats += 1

    def beats(self) -> int:
        return self._beats

    def ping(self) -> bool:
        return True


def start_sink(path: str | Path) -> "ray.actor.ActorHandle":
    """A sink on the driver's node, so `path` (a driver-side path) is the file written."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    sink = MetricsSink.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    ).remote(str(Path(path).resolve()))
    ray.get(sink.ping.remote())
    return sink


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- the progress line -----------------------------------------------------------------


def say(line: str) -> None:
    """Print a line from a training worker, once.

    Ray Train 2.60 replaces `print` in its workers: the text goes to its logger, whose console
    handler prints it, and is also teed to the original print whenever `sys.stdout` is a
    wrapper (it is, in the workers), so every progress line reached the job's output twice.
    Writing to the process's own stdout takes neither path: one copy, which Ray forwards to
    the driver like any worker output."""
    out = sys.__stdout__ or sys.stdout
    out.write(line + "\n")
    out.flush()


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Throughput:
    """Tokens/s and ETA over one attempt (a restart resets the clock, not the step)."""

    def __init__(self, start_step: int, max_steps: int, tokens_per_step: int, clock=time.monotonic):
        self.clock = clock
        self.t0 = clock()
        self.start_step = start_step
        self.max_steps = max_steps
        self.tokens_per_step = tokens_per_step
        self.first: Optional[tuple[int, float]] = None  # (step, time) after the first step
        self.last: Optional[tuple[int, float]] = None

    def step_done(self, step: int) -> None:
        now = self.clock()
        if self.first is None:
            self.first = (step, now)
        self.last = (step, now)

    def steady_tokens_per_s(self) -> Optional[float]:
        """Tokens/s from the end of the first step to the end of the last one: leaves out
        start-up (process group, DeepSpeed init, the stream's first blocks) and the final
        eval/save, so it measures training itself. None with fewer than 2 steps."""
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return None
        return round((self.last[0] - self.first[0]) * self.tokens_per_step / (self.last[1] - self.first[1]), 1)

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def tokens_per_s(self, step: int) -> float:
        dt = self.elapsed()
        return (step - self.start_step) * self.tokens_per_step / dt if dt > 0 else 0.0

    def eta_s(self, step: int) -> Optional[float]:
        done = step - self.start_step
        if done <= 0:
            return None
        return (self.max_steps - step) * self.elapsed() / done


def progress_line(step: int, max_steps: int, logs: dict[str, Any], tokens_per_s: float,
                  eta_s: Optional[float]) -> str:
    parts = [f"step {step}/{max_steps}"]
    if "loss" in logs:
        parts.append(f"loss {logs['loss']:.4f}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if "eval_loss" in logs:
        parts.append(f"eval_loss {logs['eval_loss']:.4f} ppl {logs.get('eval_perplexity', float('nan')):.1f}")
    parts.append(f"{tokens_per_s:,.0f} tok/s")
    parts.append(f"ETA {format_duration(eta_s)}")
    return "[train] " + " | ".join(parts)


# ---- the loss plot ---------------------------------------------------------------------


def loss_curves(events: Iterable[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) pairs; a restarted run's repeats keep the last."""
    train: dict[int, float] = {}
    valid: dict[int, float] = {}
    for e in events:
        if e.get("event") != "log":
            continue
        if "loss" in e:
            train[int(e["step"])] = float(e["loss"])
        if "eval_loss" in e:
            valid[int(e["step"])] = float(e["eval_loss"])
    return sorted(train.items()), sorted(valid.items())


def plot_loss(events: Iterable[dict[str, Any]], png_path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    train, valid = loss_curves(events)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
