"""Continuous batching: one decode loop per replica that requests join at any step.

With plain @serve.batch, a batch decodes to its end before the next one starts, so a
request arriving one step late waits for the whole batch; under steady load arrivals
stagger and batches shrink to 1-3 requests. Here the batch handler only *submits* its
requests; this loop prefills them and merges them into the rows already decoding at the
next step boundary, and every row leaves as soon as it is done. On a small model a step
costs nearly the same for 1 row or 64, so throughput grows with the rows in flight.

Each submitted group gets, through its `emit` callback (called on the loop's thread):
a list with one entry per request for every step that produced something (a Delta or
None), then None once all of its requests have finished, or the exception that broke
the step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Optional, Sequence

import torch

from serving.batch_state import BatchState
from serving.engine import Delta, Engine, SamplingParams

Emit = Callable[[Any], None]


class _Group:
    def __init__(self, rows: list, encoded: list[list[int]], emit: Emit):
        self.rows, self.encoded, self.emit = rows, encoded, emit
        self.left = len(rows)
        self.submitted = time.perf_counter()  # for time-to-first-token


class DecodeLoop:
    def __init__(self, engine: Engine, max_rows: int = 64):
        self.engine, self.max_rows = engine, max(1, max_rows)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._start = threading.Lock()
        self.steps = 0  # decode steps run (for tests and stats)
        self.max_rows_seen = 0  # the most rows that ever decoded together
        # Optional: gets step(rows, waiting, first_token_s, finished) after every step
        # (serving/service_metrics.py); None records nothing.
        self.observer: Optional[Any] = None
        self._done_rows: list = []  # rows that finished in the last step, for the observer

    def submit(self, prompts: Sequence[str], params: Sequence[SamplingParams],
               incremental: Sequence[bool], emit: Emit) -> None:
        """Queue requests to join the running batch. Raises ValueError for an impossible one."""
        rows, encoded = self.engine.start_rows(prompts, params, incremental)
        self._inbox.put(_Group(rows, encoded, emit))
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        with torch.inference_mode():
            pending: deque[_Group] = deque()
            state: Optional[BatchState] = None
            members: list[tuple[_Group, int]] = []  # batch row -> (group, request index in it)
            next_ids: list[int] = []
            while True:
                if not members and not pending:
                    if self.observer is not None:
                        self.observer.step(0, 0, [], [])  # idle: the gauges say so
                    pending.append(self._inbox.get())  # idle: sleep until work arrives
                while True:
                    try:
                        pending.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                joining: list[_Group] = []
                room = self.max_rows - len(members)
                while pending and (len(pending[0].rows) <= room or not (members or joining)):
                    room -= len(pending[0].rows)
                    joining.append(pending.popleft())
                rows = len(members) + sum(len(g.rows) for g in joining)
                try:
                    state, members, next_ids = self._step(state, members, next_ids, joining)
                except BaseException as e:  # every request in the batch gets the error
                    for g in list({id(g): g for g, _ in members}.values()) + joining:
                        g.emit(e)
                    state, members, next_ids = None, [], []
                if self.observer is not None:
                    self._observe(rows, pending, joining)

    def _observe(self, rows: int, pending: deque, joining: list[_Group]) -> None:
        """Report a step: rows that decoded, requests waiting, first tokens, finished requests."""
        now = time.perf_counter()
        finished, self._done_rows = [(r.prompt_tokens, r.generated) for r in self._done_rows], []
        self.observer.step(rows, sum(len(g.rows) for g in pending) + self._inbox.qsize(),
                           [now - g.submitted for g in joining for _ in g.rows], finished)

    def _step(self, state: Optional[BatchState], members: list[tuple[_Group, int]], next_ids: list[int],
              joining: list[_Group]) -> tuple[Optional[BatchState], list[tuple[_Group, int]], list[int]]:
        """One step: the running rows decode a token, the joining ones prefill, all sample."""
        engine = self.engine
        logits = [state.step(engine.model, next_ids)] if members else []
        if joining:
            new, new_logits = BatchState.prefill(engine.model, [ids for g in joining for ids in g.encoded],
                                                 engine.pad_token_id)
            logits.append(new_logits)
            if members:
                state.merge(new)
            else:
                state = new
            members = members + [(g, i) for g in joining for i in range(len(g.rows))]
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(members))
        ids, deltas, keep = engine.advance([g.rows[i] for g, i in members],
                                           torch.cat(logits) if len(logits) > 1 else logits[0])
        if self.observer is not None:
            self._done_rows = [g.rows[i] for g, i in members if g.rows[i].done]

        steps: dict[int, tuple[_Group, list[Optional[Delta]]]] = {}
        for (g, i), delta in zip(members, deltas):
            steps.setdefault(id(g), (g, [None] * len(g.rows)))[1][i] = delta
            g.left -= g.rows[i].done
        for g, step in steps.values():
            if any(d is not None for d in step):
                g.emit(step)
            if g.left == 0:
                g.emit(None)
        if not keep:
            return None, [], []
        if len(keep) < len(members):
            state.keep(keep)
        return state, [members[b] for b in keep], [ids[b] for b in keep]
