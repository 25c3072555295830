"""Continuous batching: one decode loop per replica that requests join at any step.

With a batch that decodes to its end before the next one starts (plain @serve.batch), a
request arriving one step late waits for the whole batch; under steady load arrivals
stagger and batches shrink to a few requests. Here a request only *submits* itself; this
loop prefills what arrived and merges it into the rows already decoding at the next step
boundary, and every row leaves as soon as it is done. On a small model a step
costs nearly the same for 1 row or 64, so throughput grows with the rows in flight.

Each submitted group gets, through its `emit` callback (called on the loop's thread):
a list with one entry per request for every step that produced something (a Delta or
None), then None once all of its requests have finished, or the exception that broke
the step.

One request never takes others down: a request whose sampling or output processing
fails ends with its own "error" Delta (`_advance`), a group whose prefill fails gets the
exception alone, and when the running batch's forward pass fails, each row is run alone
so that only the rows that fail alone end (with an "error" Delta each).
A request whose `cancel` event is set (its client went away) leaves the batch before the
next forward pass, with a "cancelled" Delta.

The loop runs on its own thread (a replica, LocalBackend), or on the caller's:
`DecodeLoop(engine, threaded=False)`, `submit(...)`, then `run_until_done()` (Engine.generate,
hence evaluation). Both run the same `step()`. The model work goes through the engine's
`prefill`, `forward` and `sample` attributes, which an engine plugin may wrap
(serving/engine/plugins.py).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Optional, Sequence

import torch

from serving.engine import output
from serving.engine.logprobs import step_logprobs
from serving.engine.output import Row
from serving.engine.params import Delta, SamplingParams

Emit = Callable[[Any], None]
Members = list[tuple["_Group", int]]  # batch row -> (group, request index in it)


class _Group:
    def __init__(self, rows: list[Row], encoded: list[list[int]], emit: Emit):
        self.rows, self.encoded, self.emit = rows, encoded, emit
        self.left = len(rows)
        self.submitted = time.perf_counter()  # for time-to-first-token


def _abandoned(g: _Group) -> bool:
    """Every row of the group was cancelled (its client went away) before it joined the batch."""
    return all(r.cancel is not None and r.cancel.is_set() for r in g.rows)


class DecodeLoop:
    """Continuous batching over an Engine (serving/engine/engine.py): its start_rows, prefill,
    forward, sample, end_ids, detokenize and piece."""

    def __init__(self, engine: Any, max_rows: int = 64, threaded: bool = True):
        self.engine, self.max_rows = engine, max(1, max_rows)
        self.threaded = threaded  # False: the caller steps the loop (run_until_done)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._start = threading.Lock()
        self._pending: deque[_Group] = deque()
        self._state: Any = None  # the running rows' BatchState
        self._members: Members = []
        self._next_ids: list[int] = []
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

    def submit(self, prompts: Sequence[Any], params: Sequence[SamplingParams],
               incremental: Sequence[bool], emit: Emit,
               cancel: Optional[Sequence[Optional[threading.Event]]] = None) -> None:
        """Queue requests to join the running batch. Raises ValueError for an impossible one."""
        rows, encoded = self.engine.start_rows(prompts, params, incremental, cancel)
        self._inbox.put(_Group(rows, encoded, emit))
        if not self.threaded:
            return
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
                self._thread.start()

    def idle(self) -> bool:
        """Nothing decoding and nothing waiting to join."""
        return not self._members and not self._pending and self._inbox.empty()

    def run_until_done(self) -> None:
        """Step on the caller's thread until every submitted request has finished."""
        assert not self.threaded, "a threaded DecodeLoop steps on its own thread"
        with torch.inference_mode():
            while not self.idle():
                self.step()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._members and not self._pending:
                    if self.observer is not None:
                        self.observer.step(0, 0, [], [])  # idle: the gauges say so
                    self._pending.append(self._inbox.get())  # idle: sleep until work arrives
                self.step()

    def step(self) -> None:
        """One step of the loop: take in what arrived, admit what fits, decode one token for all."""
        pending = self._pending
        while True:
            try:
                pending.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        if any(_abandoned(g) for g in pending):  # clients gone while waiting: never prefilled
            for g in [g for g in pending if _abandoned(g)]:
                pending.remove(g)
                for i in range(len(g.rows)):
                    self._end_row(g, i, output.cancelled(g.rows[i]))
                self.cancelled += len(g.rows)
        joining: list[_Group] = []
        room = self.max_rows - len(self._members)
        while pending and (len(pending[0].rows) <= room or not (self._members or joining)):
            room -= len(pending[0].rows)
            joining.append(pending.popleft())
        try:
            self._step(joining)
        except BaseException as e:  # the batch's forward pass failed: every row in it did
            for g in list({id(g): g for g, _ in self._members}.values()) + joining:
                g.emit(e)
            self._set(None, [], [])
        self.live_rows = len(self._members)
        if self.observer is not None:
            self._observe(pending)

    def _set(self, state: Any, members: Members, next_ids: list[int]) -> None:
        self._state, self._members, self._next_ids = state, members, next_ids

    def _observe(self, pending: deque) -> None:
        """Report a step: rows that decoded, requests waiting, first tokens, finished requests."""
        now = time.perf_counter()
        (rows, joined, done), self._seen = self._seen, (0, [], [])
        self.observer.step(rows, sum(len(g.rows) for g in pending) + self._inbox.qsize(),
                           [now - g.submitted for g in joined for _ in g.rows],
                           [(r.prompt_tokens, r.generated) for r in done])

    def _step(self, joining: list[_Group]) -> None:
        """One step: the running rows decode a token, the joining ones prefill, all sample."""
        self._drop_cancelled()
        state, members, next_ids = self._state, self._members, self._next_ids
        t0, c0 = time.perf_counter(), time.thread_time()
        logits = []
        if members:
            try:
                logits = [self.engine.forward(state, [g.rows[i] for g, i in members], next_ids)]
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
            return self._set(None, [], [])
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(members))
        ids, deltas, keep = self._advance([g.rows[i] for g, i in members],
                                          torch.cat(logits) if len(logits) > 1 else logits[0])
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
            return self._set(None, [], [])
        if len(keep) < len(members):
            state.keep(keep)
        self._set(state, [members[b] for b in keep], [ids[b] for b in keep])

    def _advance(self, rows: Sequence[Row], logits: torch.Tensor) -> tuple[list[int], list[Optional[Delta]], list[int]]:
        """Sample, score and release one token for each row: (sampled ids, each row's Delta or
        None, batch indices of the rows that go on). A row whose sampling or output processing
        raises ends with an "error" Delta; the other rows are not affected."""
        engine, timings = self.engine, self.timings
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            next_ids = engine.sample(logits, rows)
        except Exception:  # find the culprit: sample row by row (draws are stateless, so rows repeat exactly)
            next_ids = []
            for b, row in enumerate(rows):
                try:
                    next_ids.append(engine.sample(logits[b:b + 1], [row])[0])
                except Exception as e:
                    output.fail(row, e)
                    next_ids.append(engine.pad_token_id)
        t1, c1 = time.perf_counter(), time.thread_time()
        deltas: list[Optional[Delta]] = []
        try:
            entries = step_logprobs(logits, [r.params for r in rows], next_ids, engine.piece)
        except Exception:  # only rows that asked for logprobs can fail here; they fail below
            entries = [None] * len(rows)
        ends = engine.end_ids()
        for row, token, entry in zip(rows, next_ids, entries):
            if row.done:  # failed while sampling
                deltas.append(output.failure(row))
                continue
            try:
                if row.params.logprobs is not None and entry is None:
                    raise RuntimeError("computing logprobs failed")
                deltas.append(output.append_token(row, token, entry, ends, engine.detokenize))
            except Exception as e:
                output.fail(row, e)
                deltas.append(output.failure(row))
        timings["sample_s"] += t1 - t0
        timings["sample_cpu_s"] += c1 - c0
        timings["text_s"] += time.perf_counter() - t1
        return next_ids, deltas, [b for b, row in enumerate(rows) if not row.done]

    def _forward_alone(self, state: Any, members: Members, next_ids: list[int]):
        """The running batch's forward pass failed (and left the state as it was): run each
        row alone, so the failure ends only the requests that cause it. Returns the rows
        that stepped, as (state, members, next_ids, their logits)."""
        kept: list[int] = []
        states: list[Any] = []
        logits: list[torch.Tensor] = []
        for b, (g, i) in enumerate(members):
            try:
                sub = state.select([b])
                logits.append(self.engine.forward(sub, [g.rows[i]], [next_ids[b]]))
            except Exception as e:
                output.fail(g.rows[i], e)
                self._end_row(g, i, output.failure(g.rows[i]))
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

    def _prefill(self, joining: list[_Group]) -> tuple[Any, Optional[torch.Tensor], list[_Group]]:
        """Prefill the joining groups together; if that fails, each alone, so a failure
        reaches only the group that caused it. Returns (state, logits, groups that made it)."""
        if not joining:
            return None, None, []
        prefill = self.engine.prefill
        try:
            new, logits = prefill([ids for g in joining for ids in g.encoded])
            return new, logits, joining
        except Exception as e:
            if len(joining) == 1:
                joining[0].emit(e)
                return None, None, []
        ok: list[tuple[_Group, Any, torch.Tensor]] = []
        for g in joining:
            try:
                ok.append((g, *prefill(g.encoded)))
            except Exception as e:
                g.emit(e)
        if not ok:
            return None, None, []
        state = ok[0][1]
        for _, other, _ in ok[1:]:
            state.merge(other)
        return state, torch.cat([lg for _, _, lg in ok]), [g for g, _, _ in ok]

    def _drop_cancelled(self) -> None:
        """Rows whose client went away leave before the next forward pass."""
        members = self._members
        gone = [b for b, (g, i) in enumerate(members) if g.rows[i].cancel is not None and g.rows[i].cancel.is_set()]
        if not gone:
            return
        for b in gone:
            g, i = members[b]
            self._end_row(g, i, output.cancelled(g.rows[i]))
        self.cancelled += len(gone)
        keep = sorted(set(range(len(members))) - set(gone))
        if not keep:
            return self._set(None, [], [])
        self._state.keep(keep)
        self._set(self._state, [members[b] for b in keep], [self._next_ids[b] for b in keep])
