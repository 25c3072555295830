"""Logprobs and penalties of the engine, checked against a direct transformers computation."""

from __future__ import annotations

import math

import pytest
import torch

from serving.engine.engine import Engine
from serving.engine.params import SamplingParams

PROMPT = "def foo(x):\n    return x"


def direct(engine: Engine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completion_logprobs_match_transformers(engine):
    c = engine.generate([PROMPT], [SamplingParams(max_new_tokens=8, temperature=0.7, seed=3, logprobs=3)])[0]
    prompt_ids = engine._encode(PROMPT)
    ids = [e.id for e in c.logprobs]
    assert len(ids) == c.completion_tokens and engine._decode(ids) == c.text
    lp = direct(engine, prompt_ids + ids)
    for t, e in enumerate(c.logprobs):
        row = lp[len(prompt_ids) + t - 1]
        assert math.isclose(e.logprob, float(row[e.id]), abs_tol=1e-4)
        best = row.topk(3)
        assert [engine.piece(int(i)) for i in best.indices][:1] == list(e.top)[:1]
        assert 3 <= len(e.top) <= 4 and e.top[e.token] == pytest.approx(e.logprob, abs=1e-6)
        assert max(e.top.values()) == pytest.approx(float(best.values[0]), abs=1e-4)


def test_prompt_logprobs_match_transformers(engine):
    c = engine.generate([PROMPT], [SamplingParams(max_new_tokens=1, prompt_logprobs=2)])[0]
    ids = engine._encode(PROMPT)
    assert [e.id for e in c.prompt_logprobs] == ids
    assert c.prompt_logprobs[0].logprob is None and c.prompt_logprobs[0].top is None
    lp = direct(engine, ids)
    for t in range(1, len(ids)):
        assert math.isclose(c.prompt_logprobs[t].logprob, float(lp[t - 1, ids[t]]), abs_tol=1e-4)
    assert c.logprobs == []  # not asked for the completion's


def test_frequency_penalty_stops_repetition_and_zero_changes_nothing(engine):
    plain = engine.generate([PROMPT], [SamplingParams(max_new_tokens=24)])[0]
    same = engine.generate([PROMPT], [SamplingParams(max_new_tokens=24, presence_penalty=0.0)])[0]
    assert plain.text == same.text
    ids = engine._encode(plain.text)
    assert len(set(ids)) < len(ids)  # the tiny model repeats itself greedily
    pen = engine.generate([PROMPT], [SamplingParams(max_new_tokens=24, frequency_penalty=2.0,
                                                    presence_penalty=2.0, logprobs=0)])[0]
    got = [e.id for e in pen.logprobs]
    assert len(set(got)) == len(got)  # a penalty of 2+2 per use outweighs the tiny model's margins
