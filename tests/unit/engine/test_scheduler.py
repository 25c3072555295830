"""Continuous batching (serving/engine/scheduler.py and batch_state.py) on a real tiny checkpoint:
requests that join a batch already decoding get exactly what they get alone."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from tests.support.streams import absorb
from serving.engine.batch_state import BatchState
from serving.engine.engine import Engine, SamplingParams
from serving.engine.scheduler import DecodeLoop

PROMPTS = ["def foo(x):\n    return", "import os\n", "class A:\n    def __init__(self", "x = 1",
           "for i in range(10):\n    print(i", "# a much longer prompt than the others, to pad\nimport sys\n" * 3]


def alone(engine: Engine, prompt: str, p: SamplingParams) -> str:
    return engine.generate([prompt], [p])[0].text


def test_merged_and_trimmed_state_computes_what_each_row_computes_alone(engine):
    """Prefill two groups of different widths separately, step one, merge, drop a row:
    every surviving row's logits match a fresh single-row run of the same tokens."""
    tok = engine.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    a, la = BatchState.prefill(engine.model, ids[:2], engine.pad_token_id)
    nxt = la.argmax(-1).tolist()
    la = a.step(engine.model, nxt)  # group a is one token ahead
    hist = [ids[0] + [nxt[0]], ids[1] + [nxt[1]]]
    long_ids = tok(PROMPTS[5])["input_ids"]  # wider than group a: a gets padded on the left
    b, lb = BatchState.prefill(engine.model, [long_ids, ids[2]], engine.pad_token_id)
    hist += [long_ids, ids[2]]
    a.merge(b)
    logits = torch.cat([la, lb])
    nxt = logits.argmax(-1).tolist()
    a.keep([0, 2, 3])  # row 1 leaves; padding columns only it needed are trimmed
    out = a.step(engine.model, [nxt[0], nxt[2], nxt[3]])
    assert a.attention.shape[1] == max(len(hist[r]) + 1 for r in (0, 2, 3))
    for row, r in enumerate((0, 2, 3)):
        _, ref_logits = BatchState.prefill(engine.model, [hist[r] + [nxt[r]]], engine.pad_token_id)
        assert torch.allclose(out[row], ref_logits[0], atol=1e-4), r


def collect(loop: DecodeLoop, prompts, params, delay_s: float = 0.0):
    """Submit one group; return a function that waits for its texts."""
    q: queue.Queue = queue.Queue()
    time.sleep(delay_s)
    loop.submit(prompts, params, [False] * len(prompts), q.put)

    def result(timeout: float = 60.0) -> list[str]:
        texts = [""] * len(prompts)
        while True:
            item = q.get(timeout=timeout)
            if item is None:
                return texts
            if isinstance(item, BaseException):
                raise item
            for i, d in enumerate(item):
                if d is not None:
                    texts[i] += d.text
    return result


def test_requests_joining_mid_decode_get_their_solo_completions(engine):
    loop = DecodeLoop(engine, max_rows=8)
    greedy = SamplingParams(max_new_tokens=60)
    sampled = [SamplingParams(30, 0.8, 0.95, 50, (), seed) for seed in range(3)]
    waits = [collect(loop, PROMPTS[:2], [greedy, greedy])]
    # Later groups arrive while the first is decoding, from other threads, as in a replica.
    threads, results = [], {}

    def late(k, prompts, params):
        results[k] = collect(loop, prompts, params, delay_s=0.01 * (k + 1))()

    jobs = {0: (PROMPTS[2:5], sampled), 1: (PROMPTS[5:6], [SamplingParams(10)])}
    for k, (pr, pa) in jobs.items():
        threads.append(threading.Thread(target=late, args=(k, pr, pa)))
        threads[-1].start()
    first = waits[0]()
    for t in threads:
        t.join(60)
    assert first == [alone(engine, p, greedy) for p in PROMPTS[:2]]
    for k, (pr, pa) in jobs.items():
        assert results[k] == [alone(engine, p, q) for p, q in zip(pr, pa)], k
    assert loop.max_rows_seen >= 3  # they really decoded together
    # Fewer steps than running the groups one after another.
    assert loop.steps < 60 + 30 + 10


def test_row_cap_holds_and_bad_requests_fail_at_submit(engine):
    loop = DecodeLoop(engine, max_rows=2)
    waits = [collect(loop, [p], [SamplingParams(8)]) for p in PROMPTS[:5]]
    assert [w()[0] for w in waits] == [alone(engine, p, SamplingParams(8)) for p in PROMPTS[:5]]
    assert loop.max_rows_seen == 2
    with pytest.raises(ValueError, match="max_new_tokens"):
        loop.submit(["x"], [SamplingParams(max_new_tokens=10_000)], [False], lambda item: None)


def test_failing_request_and_cancelled_request_leave_the_others_alone(engine, faulty):
    loop = DecodeLoop(engine, max_rows=8)
    q: queue.Queue = queue.Queue()
    cancel = [threading.Event() for _ in range(3)]
    prompts = [PROMPTS[0], "#poison#x", PROMPTS[1]]
    params = [SamplingParams(40), SamplingParams(40, 0.7, seed=1), SamplingParams(40, 0.9, seed=4)]
    loop.submit(prompts, params, [True] * 3, q.put, cancel=cancel)
    texts, finals, steps_at_cancel = ["", "", ""], {}, None
    while True:
        item = q.get(timeout=60)
        if item is None:
            break
        assert not isinstance(item, BaseException), item
        for i, d in enumerate(item):
            if d is not None:
                texts[i] += d.text
                if d.finished:
                    finals[i] = (d, loop.steps)
        if steps_at_cancel is None and len(texts[0]) > 0:
            cancel[0].set()  # the client of request 0 went away
            steps_at_cancel = loop.steps
    assert finals[1][0].finish_reason == "error"
    assert finals[0][0].finish_reason == "cancelled" and finals[0][1] <= steps_at_cancel + 1
    assert finals[2][0].finish_reason in ("length", "eos") and texts[2] == alone(engine, prompts[2], params[2])
    deadline = time.monotonic() + 10
    while loop.live_rows and time.monotonic() < deadline:  # set just after the step that emitted the end
        time.sleep(0.01)
    assert loop.cancelled == 1 and loop.live_rows == 0


def test_a_failed_step_leaves_the_state_as_it_was_and_rows_copy_out(engine):
    """A step that fails half-way (here: after the written-out step has extended the cache)
    leaves the state unchanged, so its rows can be retried; a row copied out with
    `select` steps to the logits it gets in the batch."""
    tok = engine.tokenizer
    ids = [tok(p)["input_ids"] for p in (PROMPTS[0], PROMPTS[5], PROMPTS[3])]
    state, logits = BatchState.prefill(engine.model, ids, engine.pad_token_id, engine.fast_step)
    nxt = logits.argmax(-1).tolist()
    before = (state.attention, state.positions, [(l.keys, l.values) for l in state.cache.layers])

    def breaks_after_the_cache_grew(*args):
        engine.fast_step(*args)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        state.step(engine.model, nxt, breaks_after_the_cache_grew)
    assert state.attention is before[0] and state.positions is before[1]
    assert [(l.keys, l.values) for l in state.cache.layers] == before[2]

    alone = state.select([2])  # the short prompt: its padding columns are trimmed
    assert alone.attention.shape == (1, len(ids[2])) and len(state) == 3
    together = state.step(engine.model, nxt, engine.fast_step)
    assert torch.allclose(alone.step(engine.model, [nxt[2]], engine.fast_step)[0], together[2], atol=1e-4)


def test_a_forward_pass_failure_ends_only_the_request_that_causes_it(engine, faulty):
    """A request that breaks every decode forward pass it is in (injected) shares the
    batch with three others: it alone ends with an error; they get their solo completions."""
    loop = DecodeLoop(engine, max_rows=8)
    prompts = [PROMPTS[0], "#poison#forward def f(", PROMPTS[1], PROMPTS[4]]
    params = [SamplingParams(30), SamplingParams(30), SamplingParams(30, 0.8, seed=3), SamplingParams(12)]
    q: queue.Queue = queue.Queue()
    loop.submit(prompts, params, [False] * 4, q.put)
    finals, texts = {}, [""] * 4
    while (item := q.get(timeout=60)) is not None:
        assert not isinstance(item, BaseException), item
        absorb(item, texts, finals)
    assert finals[1].finish_reason == "error" and "forward pass" in finals[1].error
    for i in (0, 2, 3):
        assert finals[i].finish_reason != "error" and texts[i] == alone(engine, prompts[i], params[i]), i
    assert loop.max_rows_seen == 4
    assert [w()[0] for w in [collect(loop, [PROMPTS[2]], [SamplingParams(8)])]] == \
        [alone(engine, PROMPTS[2], SamplingParams(8))]  # the loop goes on serving
