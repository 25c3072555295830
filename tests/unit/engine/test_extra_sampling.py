"""vLLM's extra sampling parameters in the native engine: repetition_penalty, min_p,
min_tokens, stop_token_ids, include_stop_str_in_output, skip_special_tokens (with ignore_eos),
held to their definitions on the sampler's functions and to their effect on real completions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from serving.engine.params import SamplingParams
from serving.engine.sampling import apply_min_p, apply_repetition_penalty, ban_early_ends

PROMPT = "def foo(x):\n    return x"


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5]])
    out = apply_repetition_penalty(logits, [SamplingParams(repetition_penalty=2.0)], [[0]], [[1, 1]])
    assert out.tolist() == [[1.0, -4.0, 3.0, -1.0, 0.5]]  # prompt token 0 and generated token 1 only
    assert logits.tolist() == [[2.0, -2.0, 3.0, -1.0, 0.5]]  # the caller's logits stay
    assert apply_repetition_penalty(logits, [SamplingParams()], [[0]], [[1]]) is logits  # 1.0: no copy


def test_min_p_drops_exactly_the_tokens_below_min_p_times_the_best_after_temperature():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    params = [SamplingParams(temperature=0.7, min_p=0.1), SamplingParams(temperature=1.5, min_p=0.3),
              SamplingParams(temperature=0.0, min_p=0.9)]
    out = apply_min_p(logits, params)
    for b, p in enumerate(params[:2]):
        probs = torch.softmax(logits[b].double() / p.temperature, dim=-1)
        keep = probs >= p.min_p * probs.max()
        assert torch.equal(torch.isfinite(out[b]), keep)
        assert torch.equal(out[b][keep], logits[b][keep])
    assert torch.equal(out[2], logits[2])  # greedy: the best token is the answer anyway


@dataclass
class _Row:
    params: SamplingParams
    generated: int
    tokens: list = field(default_factory=list)


def test_min_tokens_bans_end_and_stop_tokens_until_reached():
    logits = torch.zeros(3, 10)
    rows = [_Row(SamplingParams(min_tokens=2, stop_token_ids=(7,)), generated=1),
            _Row(SamplingParams(min_tokens=2, stop_token_ids=(7,)), generated=2),
            _Row(SamplingParams(min_tokens=5, ignore_eos=True), generated=0)]
    out = ban_early_ends(logits, rows, ends={0, 9})
    assert [i for i in range(10) if math.isinf(out[0, i])] == [0, 7, 9]
    assert torch.isfinite(out[1]).all()  # min_tokens reached
    assert torch.isfinite(out[2]).all()  # end tokens do not end a row that ignores them


def _greedy(engine, **kw):
    return engine.complete(PROMPT, max_new_tokens=kw.pop("max_new_tokens", 12), temperature=0.0, **kw)


def test_stop_token_ids_end_the_completion_before_the_token_unless_included(engine):
    base = _greedy(engine)
    ids = engine.tokenize(base.text)
    # the first token that appears only once, from the third on: the completion must stop there
    k = next(i for i in range(2, len(ids)) if ids.index(ids[i]) == i)
    stopped = _greedy(engine, stop_token_ids=(ids[k],))
    assert stopped.finish_reason == "stop" and stopped.text == engine.detokenize(ids[:k])
    assert stopped.completion_tokens == k + 1  # the stop token counts, as in vLLM
    kept = _greedy(engine, stop_token_ids=(ids[k],), include_stop_str_in_output=True)
    assert kept.finish_reason == "stop" and kept.text == engine.detokenize(ids[:k + 1])
    held = _greedy(engine, stop_token_ids=(ids[k],), min_tokens=k + 2)
    assert held.completion_tokens > k + 1 and held.text != stopped.text  # no stop before min_tokens


def test_stop_strings_keep_the_string_when_asked_and_wait_for_min_tokens(engine):
    base = _greedy(engine, max_new_tokens=16)
    stop = base.text[3:5]
    first = base.text.find(stop)
    cut = _greedy(engine, max_new_tokens=16, stop=(stop,))
    assert cut.finish_reason == "stop" and cut.text == base.text[:first]
    kept = _greedy(engine, max_new_tokens=16, stop=(stop,), include_stop_str_in_output=True)
    assert kept.finish_reason == "stop" and kept.text == base.text[:first + len(stop)]
    late = _greedy(engine, max_new_tokens=16, stop=(stop,), min_tokens=16)
    assert late.finish_reason == "length" and late.text == base.text


def test_repetition_penalty_changes_a_greedy_completion_toward_unseen_tokens(engine):
    base = _greedy(engine, max_new_tokens=24)
    penalised = _greedy(engine, max_new_tokens=24, repetition_penalty=3.0)
    assert penalised.text != base.text
    repeats = lambda c: len(engine.tokenize(c.text)) - len(set(engine.tokenize(c.text)))  # noqa: E731
    assert repeats(penalised) < repeats(base)  # the base loops on a few tokens


def test_skip_special_tokens_false_shows_the_end_tokens_decoded_past(engine):
    eos = engine.eos_token_id
    real = engine.sample
    # Make the second sampled token end-of-text (the model rarely picks it here).
    engine.sample = lambda logits, rows: [eos if r.generated == 1 else t for r, t in zip(rows, real(logits, rows))]
    try:
        hidden = _greedy(engine, max_new_tokens=4, ignore_eos=True)
        shown = _greedy(engine, max_new_tokens=4, ignore_eos=True, skip_special_tokens=False)
        ended = _greedy(engine, max_new_tokens=4)
    finally:
        engine.sample = real
    assert ended.finish_reason == "eos" and ended.completion_tokens == 2
    assert hidden.completion_tokens == shown.completion_tokens == 4
    assert "<|endoftext|>" not in hidden.text and "<|endoftext|>" in shown.text
