"""Nothing hangs silently: a stage that makes no progress for `--stall-timeout` fails the job.

A Ray job that cannot get the resources it asks for does not fail, it waits: a task or
placement group stays pending forever. The driver watches each long stage from a thread:

- progress is a value that changes while the stage moves (the training workers' heartbeat,
  kept by the metrics sink), or, for a stage with no such signal (the data stage), the
  absence of resource demand that Ray cannot place; an autoscaler launching nodes counts
  as progress too;
- when it has not moved for `stall_timeout` seconds, the watchdog prints one line naming
  the stage, the resource demand Ray reports as pending and the flag that fixes it, and
  interrupts the driver's main thread (SIGINT); `stop_if_fired` turns that into a `StallError`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable, Optional

from training.config import ConfigError

FIX_HINT = ("lower --cpus-per-worker or --num-workers, free the cluster's CPUs, or raise --stall-timeout "
            "if the stage is just slow")


class StallError(ConfigError):
    """A stage made no progress for stall_timeout seconds (one line, exit code 2)."""


def _cluster_status() -> Any:
    import ray

    if not ray.is_initialized():
        return None
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        return get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - a status we cannot read is not a stall
        return None


def autoscaler_busy() -> bool:
    """The autoscaler is launching nodes: waiting for them is progress, not a stall
    (cloud GPU nodes can take many minutes)."""
    status = _cluster_status()
    return bool(status is not None and (status.pending_launches or status.pending_nodes))


def pending_demand() -> list[dict[str, float]]:
    """Resource shapes Ray has been asked for and could not place yet (tasks, actors,
    placement-group bundles), as `ray status` shows them. Empty when all is placed."""
    status = _cluster_status()
    if status is None:
        return []
    d = status.resource_demands
    out: list[dict[str, float]] = []
    for demand in (*d.ray_task_actor_demand, *d.placement_group_demand):
        for b in demand.bundles_by_count:
            out.extend([dict(b.bundle)] * max(1, int(b.count)))
    return out


def describe(demand: list[dict[str, float]]) -> str:
    if not demand:
        return "no pending resource demand"
    shapes: dict[str, int] = {}
    for b in demand:
        key = "{" + ", ".join(f"'{k}': {v:g}" for k, v in sorted(b.items())) + "}"
        shapes[key] = shapes.get(key, 0) + 1
    return "pending resource demand " + ", ".join(f"{n} x {k}" for k, n in shapes.items())


class Watchdog:
    """with Watchdog("training", 300, progress=sink_beat): trainer.fit()"""

    def __init__(self, stage: str, timeout_s: float, progress: Optional[Callable[[], Any]] = None,
                 poll_s: float = 5.0, demand: Callable[[], list] = pending_demand,
                 scaling: Callable[[], bool] = autoscaler_busy):
        self.stage, self.timeout_s, self.progress, self.demand = stage, timeout_s, progress, demand
        self.scaling = scaling
        self.poll_s = min(poll_s, max(timeout_s / 4, 0.5))
        self.message: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchdog-{stage}", daemon=True)

    def __enter__(self) -> "Watchdog":
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def _moved(self, last: Any) -> tuple[bool, Any, list]:
        demand = self.demand()
        if self.progress is None:  # no signal of its own: moving = nothing unplaceable
            return not demand, None, demand
        try:
            now = self.progress()
        except Exception:  # noqa: BLE001 - e.g. the sink is busy: count as no news
            now = last
        return now != last, now, demand

    def _run(self) -> None:
        last = None if self.progress is None else self._safe_progress()
        since = time.monotonic()
        while not self._stop.wait(self.poll_s):
            moved, last, demand = self._moved(last)
            if moved or self.scaling():
                since = time.monotonic()
            elif time.monotonic() - since >= self.timeout_s:
                self.message = (f"{self.stage} stage made no progress for {self.timeout_s:g}s "
                                f"(--stall-timeout): {describe(demand)}; {FIX_HINT}")
                print(f"[job] error: {self.message}", flush=True)
                # A real SIGINT to the main thread (not _thread.interrupt_main, which
                # leaves a blocking call asleep): Ctrl-C's path, which Ray Train turns into
                # a graceful abort of the run.
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                if not self._stop.wait(120):  # the main thread did not come back: end it
                    os._exit(2)
                return

    def _safe_progress(self) -> Any:
        try:
            return self.progress()  # type: ignore[misc]
        except Exception:  # noqa: BLE001
            return None

    def stop_if_fired(self) -> None:
        if self.message:
            raise StallError(self.message)


def watched(stage: str, timeout_s: float, fn: Callable[[], Any], progress: Optional[Callable[[], Any]] = None,
            demand: Callable[[], list] = pending_demand) -> Any:
    """fn() under a Watchdog; a stall becomes a StallError instead of a KeyboardInterrupt."""
    with Watchdog(stage, timeout_s, progress, demand=demand) as dog:
        try:
            result = fn()
        except BaseException:  # KeyboardInterrupt, or what Ray's own SIGINT handler makes of it
            dog.stop_if_fired()
            raise
        dog.stop_if_fired()  # Ray Train aborts the run on the interrupt and may return normally
        return result
