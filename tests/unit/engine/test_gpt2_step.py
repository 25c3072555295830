"""The written-out GPT-2 prefill and decode step (serving/engine/gpt2_step.py) against the model's
own forward.

Same weights, same cache, same rows: at every step the logits must match Hugging Face's
within fp32 rounding, for ragged (left-padded) rows, after rows leave (keep) and after a
new batch joins (merge): the operations the decode loop performs between steps."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from serving.engine.batch_state import BatchState
from serving.engine.engine import Engine
from serving.engine import gpt2_step
from serving.engine.gpt2_step import decoder_for

TOL = 2e-4  # fp32 logits of a small GPT-2: different kernels, same sums in another order


def _model(**kw) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_positions=64, n_layer=2, n_head=4, n_embd=32, **kw)
    return GPT2LMHeadModel(cfg).eval()


def _prompts(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 290 + 1 for j in range(3 + 5 * i)] for i in range(n)]


def _run(model, fast, steps: int, ops: dict[int, tuple]) -> list[torch.Tensor]:
    """Decode greedily; at step s apply ops[s] ("keep", rows) or ("merge", prompts)."""
    state, logits = BatchState.prefill(model, _prompts(4), pad_id=0, fast=fast)
    out = [logits]
    for s in range(steps):
        ids = logits.argmax(-1).tolist()
        op = ops.get(s)
        if op and op[0] == "keep":
            state.keep(op[1])
            ids = [ids[r] for r in op[1]]
        logits = state.step(model, ids, fast)
        if op and op[0] == "merge":
            other, new_logits = BatchState.prefill(model, op[1], pad_id=0, fast=fast)
            state.merge(other)
            logits = torch.cat([logits, new_logits])
        out.append(logits)
    return out


@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_matches_the_models_forward_through_keep_and_merge(activation):
    model = _model(activation_function=activation)
    fast = decoder_for(model)
    assert fast is not None
    ops = {2: ("keep", [0, 2, 3]), 4: ("merge", [[5, 6, 7, 8, 9, 10, 11], [12]]), 7: ("keep", [3, 1])}
    ref = _run(model, None, 10, ops)
    got = _run(model, fast, 10, ops)
    assert [t.shape for t in got] == [t.shape for t in ref]
    for s, (a, b) in enumerate(zip(got, ref)):
        assert (a - b).abs().max().item() < TOL, f"step {s}"
    # And the tokens chosen are the same all the way.
    assert [t.argmax(-1).tolist() for t in got] == [t.argmax(-1).tolist() for t in ref]


@pytest.mark.parametrize("spare", [1, 3])
def test_the_cache_grows_in_place_and_still_matches(spare, monkeypatch):
    """New keys and values go into spare columns after the cache (no copy a step); with
    little room, buffers are re-made every few steps, through keep and merge, and the logits
    still match the model's forward."""
    monkeypatch.setattr(gpt2_step, "SPARE_COLUMNS", spare)
    model = _model()
    fast = decoder_for(model)
    ops = {2: ("keep", [0, 2, 3]), 4: ("merge", [[5, 6, 7, 8, 9, 10, 11], [12]]), 7: ("keep", [3, 1])}
    ref, got = _run(model, None, 12, ops), _run(model, fast, 12, ops)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) < TOL

    state, logits = BatchState.prefill(model, _prompts(3), pad_id=0, fast=fast)
    buffers = []
    for _ in range(2 * (spare + 1)):
        before = [(l.keys, l.keys.clone()) for l in state.cache.layers]
        logits = state.step(model, logits.argmax(-1).tolist(), fast)
        buffers.append(state.cache.layers[0].keys.untyped_storage().data_ptr())
        # what earlier steps handed out is never written over
        assert all(torch.equal(view, copy) for view, copy in before)
    # one buffer per spare + 1 steps: the first step moves the prefill's cache into one
    assert len(set(buffers)) == 2 and buffers[0] == buffers[spare]


def test_a_wrong_step_would_be_caught():
    """The comparison above can fail: a decoder whose attention ignores the padding mask
    gives other logits for the left-padded rows."""
    model = _model()
    fast = decoder_for(model)

    class NoMask:
        def __call__(self, ids, positions, attention, cache):
            return fast(ids, positions, torch.ones_like(attention), cache)

        def prefill(self, ids, attention, positions, cache):
            return fast.prefill(ids, torch.ones_like(attention), positions, cache)

    no_mask = NoMask()

    ref, got = _run(model, None, 3, {}), _run(model, no_mask, 3, {})
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) > 10 * TOL


def test_other_attention_variants_use_the_models_forward():
    assert decoder_for(_model(scale_attn_by_inverse_layer_idx=True)) is None
    assert decoder_for(_model(reorder_and_upcast_attn=True)) is None
    assert decoder_for(_model(activation_function="silu")) is None
    assert decoder_for(torch.nn.Linear(2, 2)) is None


def test_engine_completions_are_the_same_either_way(tiny_checkpoint):
    """Through the whole engine (sampled and greedy rows together), the written-out step
    and the model's forward give the same completions."""
    from serving.engine.params import SamplingParams

    engine = Engine(tiny_checkpoint, num_threads=1)
    assert engine.fast_step is not None
    slow = copy.copy(engine)
    slow.fast_step = None
    prompts = ["def add(a, b):\n", "import os\n", "class Stack:\n    def push(self, x):\n"]
    params = [SamplingParams(max_new_tokens=24, temperature=0.0),
              SamplingParams(max_new_tokens=24, temperature=0.8, seed=5),
              SamplingParams(max_new_tokens=12, temperature=0.3, top_p=0.9, seed=9)]
    assert [c.text for c in engine.generate(prompts, params)] == [c.text for c in slow.generate(prompts, params)]
