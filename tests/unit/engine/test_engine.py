"""The generation engine on a real tiny checkpoint, in-process (no Ray)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.support.streams import absorb, stream_batch
from serving.engine.engine import CheckpointError, Engine, check_checkpoint
from serving.engine.params import GenerationError, SamplingParams

PROMPTS = ["def foo(x):\n    return", "import os\n", "class A:\n    def __init__(self", "x = 1"]


def hf_greedy(engine: Engine, prompt: str | list[int], n: int) -> str:
    """Reference: Hugging Face's own greedy `generate` on one unpadded prompt."""
    tok = engine.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"] if isinstance(prompt, str) else prompt])
    out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                do_sample=False, pad_token_id=tok.pad_token_id)
    text = engine._decode(out[0, ids.shape[1]:].tolist())
    return text.split(tok.eos_token)[0]


def test_checkpoint_errors_name_the_folder(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="nope.*does not exist"):
        check_checkpoint(tmp_path / "nope")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="afile.*not a folder"):
        check_checkpoint(tmp_path / "afile")
    # A pickle-only folder is not accepted: weights load from safetensors only.
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled.*model.safetensors"):
        Engine(pickled)
    assert check_checkpoint(tiny_checkpoint) == tiny_checkpoint


def test_greedy_matches_hf_generate_alone_and_batched(engine):
    alone = [engine.complete(p, max_new_tokens=24) for p in PROMPTS]
    batched = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=24)] * len(PROMPTS))
    for p, a, b in zip(PROMPTS, alone, batched):
        assert a.text == b.text == hf_greedy(engine, p, 24)
        assert a.prompt_tokens == len(engine.tokenizer(p)["input_ids"])
        assert a.finish_reason in ("length", "eos") and not a.truncated


def test_seeded_sampling_is_independent_of_the_batch(engine):
    sp = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.95, top_k=40, seed=7)
    solo = engine.generate(PROMPTS[:1], [sp])[0].text
    # Same request among others with different lengths, params and seeds, in another row.
    mixed = engine.generate([PROMPTS[2], PROMPTS[0], PROMPTS[3]],
                            [SamplingParams(max_new_tokens=3), sp,
                             SamplingParams(max_new_tokens=30, temperature=1.5, seed=1)])
    assert mixed[1].text == solo
    others = {engine.generate(PROMPTS[:1], [SamplingParams(20, 0.9, 0.95, 40, (), s)])[0].text for s in range(4)}
    assert len(others) > 1, "different seeds should give different samples"


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    greedy = engine.complete(PROMPTS[1], max_new_tokens=16).text
    assert engine.complete(PROMPTS[1], max_new_tokens=16, temperature=1.0, top_k=1, seed=3).text == greedy
    assert engine.complete(PROMPTS[1], max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=3).text == greedy


def test_stop_string_ends_completion_and_is_not_streamed(engine):
    full = engine.complete(PROMPTS[0], max_new_tokens=40).text
    # A two-character stop string whose first occurrence is inside the completion.
    cut = next(i for i in range(1, len(full) - 1) if full.find(full[i:i + 2]) == i)
    stop, expected = full[cut:cut + 2], full[:cut]
    params = SamplingParams(max_new_tokens=40, stop=("@@never@@", stop))
    deltas = [step[0] for step in stream_batch(engine, [PROMPTS[0]], [params]) if step[0] is not None]
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    assert "".join(d.text for d in deltas) == expected
    assert all(stop not in d.text for d in deltas)


def test_eos_ends_with_reason_eos(engine):
    first = engine.tokenizer(engine.complete(PROMPTS[0], max_new_tokens=1).text)["input_ids"][0]
    saved = engine.eos_token_id
    engine.eos_token_id = first  # the model's very next token is now "end of text"
    try:
        c = engine.complete(PROMPTS[0], max_new_tokens=10)
    finally:
        engine.eos_token_id = saved
    assert (c.text, c.finish_reason, c.completion_tokens) == ("", "eos", 1)


def test_ignore_eos_decodes_to_length_and_leaves_end_tokens_out(engine):
    """vLLM's ignore_eos: the row decodes past end-of-text to max_new_tokens; the end tokens
    count in usage but are in neither the text nor the logprobs."""
    plain = engine.generate([PROMPTS[0]], [SamplingParams(max_new_tokens=10, logprobs=0)])[0]
    ids = [e.id for e in plain.logprobs]
    first = ids[0]
    saved = engine.eos_token_id
    engine.eos_token_id = first  # the model's very next token is now "end of text"
    try:
        ended = engine.complete(PROMPTS[0], max_new_tokens=10)
        c = engine.generate([PROMPTS[0]], [SamplingParams(max_new_tokens=10, logprobs=0, ignore_eos=True)])[0]
    finally:
        engine.eos_token_id = saved
    assert (ended.finish_reason, ended.completion_tokens) == ("eos", 1)  # the control: eos does end it
    kept = [t for t in ids if t != first]
    assert (c.finish_reason, c.completion_tokens) == ("length", 10)
    assert [e.id for e in c.logprobs] == kept and c.text == engine.detokenize(kept)


def test_long_prompt_keeps_its_tail(engine):
    long_prompt = "x = [" + ", ".join(str(i) for i in range(400)) + "]\n"
    c = engine.complete(long_prompt, max_new_tokens=30)
    assert c.truncated and c.prompt_tokens == engine.context_length - 30
    assert c.completion_tokens == 30 and c.finish_reason == "length"
    ids = engine.tokenizer(long_prompt)["input_ids"][-(engine.context_length - 30):]
    assert c.text == hf_greedy(engine, ids, 30)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.complete("x", max_new_tokens=engine.context_length)


def test_streamed_deltas_add_up_and_hold_back_partial_utf8(engine):
    params = [SamplingParams(max_new_tokens=40, temperature=1.2, seed=s) for s in range(4)]
    prompts = ["s = '\u00e9\u00e8 \u4e2d\u6587", "# \u2603 snow\n", "def f():", "\u00fc = 1"]
    texts = ["" for _ in prompts]
    for step in stream_batch(engine, prompts, params):
        for i, d in enumerate(step):
            if d is not None:
                if not d.finished:
                    assert not d.text.endswith("\ufffd")
                texts[i] += d.text
    assert texts == [c.text for c in engine.generate(prompts, params)]


def test_config_is_read_from_the_folder(engine, tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert engine.context_length == cfg["n_positions"] == 128
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("kw", [dict(top_p=1e-300), dict(top_p=5e-324, top_k=1), dict(temperature=5e-324),
                                dict(temperature=1e300, top_k=3), dict(temperature=100.0, top_p=1.0 - 1e-16),
                                dict(top_k=2**62, top_p=0.5)])
def test_edge_sampling_parameters_complete(engine, kw):
    """The former decode-step crash (top_p=1e-300 kept no token) and its relatives."""
    c = engine.complete(PROMPTS[0], max_new_tokens=6, **{"temperature": 1.0, "seed": 1, **kw})
    assert c.finish_reason in ("length", "eos") and c.completion_tokens >= 1


def test_a_request_failing_mid_decode_fails_alone(engine, faulty):
    prompts = [PROMPTS[0], "#poison#" + PROMPTS[1], PROMPTS[2], PROMPTS[3]]
    params = [SamplingParams(12, 0.8, seed=1), SamplingParams(12, 0.8, seed=2), SamplingParams(12),
              SamplingParams(12, 1.1, 0.9, 20, (), 3)]
    texts, finals = ["" for _ in prompts], {}
    for step in stream_batch(engine, prompts, params, incremental=[False] * 4):
        absorb(step, texts, finals)
    assert finals[1].finish_reason == "error" and "injected test fault" in finals[1].error
    alone = [engine.generate([prompts[i]], [params[i]])[0] for i in (0, 2, 3)]
    assert [texts[i] for i in (0, 2, 3)] == [a.text for a in alone]  # batch-mates: as if alone
    assert all(finals[i].error is None for i in (0, 2, 3))
    with pytest.raises(GenerationError, match="injected"):
        engine.complete(prompts[1], max_new_tokens=4)
