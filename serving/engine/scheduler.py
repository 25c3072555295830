"""Continuous batching: one decode loop per replica that requests join at any step.

With a batch that decodes to its end before the next one starts (plain @serve.batch), a
request arriving one step late waits for the whole batch; under steady load arrivals
stagger and batches shrink to 1-3 requests. Here a request only *submits* itself; this
loop prefills what arrived and merges it into the rows already decoding at the next step
boundary, and every row leaves as soon as it is done. On a small model a step
costs nearly the same for 1 row or 64, so throughput grows with the rows in flight.

Each submitted group gets, through its `emit` callback (called on the loop's thread):
a list with one entry per request for every step that produced something (a Delta or
None), then None once all of its requests have finished, or the exception that broke
the step.

One request never takes others down: a request whose sampling or decoding fails ends
with its own "error" Delta (Engine.advance), a group whose prefill fails gets the
exception alone, and when the running batch's forward pass fails, each row is run alone
so that only the rows that fail alone end (with an "error" Delta each).
A request whose `cancel` event is set (its client went away) leaves the batch before the
next forward pass, with a "cancelled" Delta.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Optional, Sequence

import torch

from serving.engine.batch_state import BatchState
from serving.engine.engine import Engine
from serving.engine.params import Delta, SamplingParams

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
        self.live_rows = 0  # rows in the batch after the last step
        self.cancelled = 0  # rows that left early because their client went away
        # Optional: gets step(rows, waiting, first_token_s, finished) after every step
        # (serving/deployment/service_metrics.py); None records nothing.
        self.observer: Optional[Any] = None
        self._seen: tuple = (0, [], [])  # the last step's (rows, joined groups, finished rows)
        # Where the loop's time goes (seconds, cumulative): the benchmark's profile.
        self.timings = {"prefill_s": 0.0, "forward_s": 0.0, "sample_s": 0.0, "text_s": 0.0,
                        "forward_cpu_s": 0.0, "sample_cpu_s": 0.0}

    def submit(self, prompts: Sequence[str], params: Sequence[SamplingParams],
               incremental: Sequence[bool], emit: Emit,
               cancel: Optional[Sequence[Optional[threading.Event]]] = None) -> None:
        """Queue requests to join the running batch. Raises ValueError for an impossible one."""
        rows, encoded = self.engine.start_rows(prompts, params, incremental, cancel)
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
                try:
                    state, members, next_ids = self._step(state, members, next_ids, joining)
                except BaseException as e:  # the batch's forward pass failed: every row in it did
                    for g in list({id(g): g for g, _ in members}.values()) + joining:
                        g.emit(e)
                    state, members, next_ids = None, [], []
                self.live_rows = len(members)
                if self.observer is not None:
                    self._observe(pending)

    def _observe(self, pending: deque) -> None:
        """Report a step: rows that decoded, requests waiting, first tokens, finished requests."""
        now = time.perf_counter()
        (rows, joined, done), self._seen = self._seen, (0, [], [])
        self.observer.step(rows, sum(len(g.rows) for g in pending) + self._inbox.qsize(),
                           [now - g.submitted for g in joined for _ in g.rows],
                           [(r.prompt_tokens, r.generated) for r in done])

    def _step(self, state: Optional[BatchState], members: list[tuple[_Group, int]], next_ids: list[int],
              joining: list[_Group]) -> tuple[Optional[BatchState], list[tuple[_Group, int]], list[int]]:
        """One step: the running rows decode a token, the joining ones prefill, all sample."""
        engine = self.engine
        state, members, next_ids = self._drop_cancelled(state, members, next_ids)
        t0, c0 = time.perf_counter(), time.thread_time()
        logits = []
        if members:
            try:
                logits = [self._forward(state, members, next_ids)]
            except Exception:
                state, members, next_ids, alone = self._forward_alone(state, members, next_ids)
                logits = [alone] if members else []
        t1 = time.perf_counter()
        self.timings["forward_cpu_s"] += time.thread_time() - c0
        new, new_logits, joining = self._prefill(joining)
        t2 = time.perf_counter()
        self.timings["forward_s"] += t1 - t0
        self.timings["prefill_s"] += t2 - t1
        if joining:
            logits.append(new_logits)
            if members:
                state.merge(new)
            else:
                state = new
            members = members + [(g, i) for g in joining for i in range(len(g.rows))]
        if not members:  # nothing running and every joining group failed its prefill
            return None, [], []
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(members))
        ids, deltas, keep = engine.advance([g.rows[i] for g, i in members],
                                           torch.cat(logits) if len(logits) > 1 else logits[0], self.timings)
        if self.observer is not None:  # reported by _observe once the step is over
            self._seen = (len(members), joining, [g.rows[i] for g, i in members if g.rows[i].done])

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

    def _forward(self, state: BatchState, members: list[tuple[_Group, int]], next_ids: list[int]) -> torch.Tensor:
        self.engine.check_forward([g.rows[i] for g, i in members])  # test-only fault injection
        return state.step(self.engine.model, next_ids, self.engine.fast_step)

    def _forward_alone(self, state: BatchState, members: list[tuple[_Group, int]], next_ids: list[int]):
        """The running batch's forward pass failed (and left the state as it was): run each
        row alone, so the failure ends only the requests that cause it. Returns the rows
        that stepped, as (state, members, next_ids, their logits)."""
        kept: list[int] = []
        states: list[BatchState] = []
        logits: list[torch.Tensor] = []
        for b, (g, i) in enumerate(members):
            try:
                sub = state.select([b])
                logits.append(self._forward(sub, [(g, i)], [next_ids[b]]))
            except Exception as e:
                self._end_row(g, i, self.engine.fail(g.rows[i], e))
                continue
            kept.append(b)
            states.append(sub)
        if not kept:
            return None, [], [], None
        for other in states[1:]:
            states[0].merge(other)
        return states[0], [members[b] for b in kept], [next_ids[b] for b in kept], torch.cat(logits)

    @staticmethod
    def _end_row(g: _Group, i: int, delta: Delta) -> None:
        """Hand a row that left the batch early its final Delta (and its group its end)."""
        g.left -= 1
        step: list[Optional[Delta]] = [None] * len(g.rows)
        step[i] = delta
        g.emit(step)
        if g.left == 0:
            g.emit(None)

    def _prefill(self, joining: list[_Group]) -> tuple[Optional[BatchState], Optional[torch.Tensor], list[_Group]]:
        """Prefill the joining groups together; if that fails, each alone, so a failure
        reaches only the group that caused it. Returns (state, logits, groups that made it)."""
        if not joining:
            return None, None, []
        model, pad, fast = self.engine.model, self.engine.pad_token_id, self.engine.fast_step
        try:
            new, logits = BatchState.prefill(model, [ids for g in joining for ids in g.encoded], pad, fast)
            return new, logits, joining
        except Exception as e:
            if len(joining) == 1:
                joining[0].emit(e)
                return None, None, []
        ok: list[tuple[_Group, BatchState, torch.Tensor]] = []
        for g in joining:
            try:
                ok.append((g, *BatchState.prefill(model, g.encoded, pad, fast)))
            except Exception as e:
                g.emit(e)
        if not ok:
            return None, None, []
        state = ok[0][1]
        for _, other, _ in ok[1:]:
            state.merge(other)
        return state, torch.cat([lg for _, _, lg in ok]), [g for g, _, _ in ok]

    def _drop_cancelled(self, state: Optional[BatchState], members: list[tuple[_Group, int]], next_ids: list[int]):
        """Rows whose client went away leave before the next forward pass."""
        gone = [b for b, (g, i) in enumerate(members) if g.rows[i].cancel is not None and g.rows[i].cancel.is_set()]
        if not gone:
            return state, members, next_ids
        for b in gone:
            g, i = members[b]
            row = g.rows[i]
            row.done = True
            self._end_row(g, i, Delta("", True, "cancelled", row.prompt_tokens, row.generated, row.truncated))
        self.cancelled += len(gone)
        keep = sorted(set(range(len(members))) - set(gone))
        if not keep:
            return None, [], []
        state.keep(keep)
        return state, [members[b] for b in keep], [next_ids[b] for b in keep]
