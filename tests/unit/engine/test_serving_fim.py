"""FIM prompts at inference: sentinel layout, far-side truncation, prefix kept longer."""

from __future__ import annotations

import json

from serving.engine.fim import FimSpec, fim_prompt_ids, read_fim, split_budget

SPEC = FimSpec(prefix_id=1, middle_id=2, suffix_id=3, pad_id=4, fim_rate=0.5, format="starcoder")


def test_fitting_prompt_is_psm_with_both_sides_whole():
    ids, cut = fim_prompt_ids([10, 11], [20, 21, 22], SPEC, budget=100)
    assert ids == [1, 10, 11, 3, 20, 21, 22, 2] and not cut


def test_long_sides_are_cut_on_their_far_side_and_the_prefix_keeps_more():
    prefix, suffix = list(range(100, 200)), list(range(200, 300))
    ids, cut = fim_prompt_ids(prefix, suffix, SPEC, budget=43)
    assert cut and len(ids) == 43 and ids[0] == 1 and ids[-1] == 2
    s = ids.index(3)
    kept_prefix, kept_suffix = ids[1:s], ids[s + 1:-1]
    assert kept_prefix == prefix[-len(kept_prefix):]  # the text right before the cursor stays
    assert kept_suffix == suffix[:len(kept_suffix)]  # the text right after the cursor stays
    assert len(kept_prefix) > len(kept_suffix) >= 40 // 4


def test_budget_split_gives_a_short_side_all_it_needs():
    assert split_budget(5, 500, 100) == (5, 95)
    assert split_budget(500, 5, 100) == (95, 5)
    assert split_budget(500, 500, 100) == (75, 25)
    assert split_budget(0, 0, 0) == (0, 0)


def test_read_fim_needs_a_positive_rate_and_the_sentinels(tmp_path):
    vocab = {"<fim_prefix>": 1, "<fim_middle>": 2, "<fim_suffix>": 3, "<fim_pad>": 4}
    assert read_fim(tmp_path, vocab) is None  # no fim.json: an older, left-to-right folder
    (tmp_path / "fim.json").write_text(json.dumps({"fim_rate": 0.0}))
    assert read_fim(tmp_path, vocab) is None
    (tmp_path / "fim.json").write_text(json.dumps({"fim_rate": 0.5, "format": "starcoder"}))
    assert read_fim(tmp_path, vocab) == SPEC
    assert read_fim(tmp_path, {"<fim_prefix>": 1}) is None


def test_engine_infills_with_the_fim_prompt_and_never_returns_a_sentinel(tiny_fim_checkpoint, tiny_checkpoint):
    import pytest

    from serving.engine.engine import Engine, SamplingParams
    from serving.engine.fim import Infill, NoInfill

    engine = Engine(tiny_fim_checkpoint, num_threads=1)
    hole = Infill("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n")
    ids, cut = engine.encode_prompt(hole, 20)
    assert not cut and ids == fim_prompt_ids(engine._encode(hole.prefix), engine._encode(hole.suffix),
                                             engine.fim, 128 - 20)[0]
    outs = engine.generate([hole] * 4, [SamplingParams(max_new_tokens=20, temperature=1.0, seed=s) for s in range(4)])
    assert all("<fim_" not in c.text and "<|endoftext|>" not in c.text for c in outs)
    first = engine.generate([hole], [SamplingParams(max_new_tokens=1)])[0]
    first_id = engine._encode(first.text)[0] if first.text else None
    if first_id is not None:  # the model's next token now counts as <fim_pad>: the middle ends there
        engine.sentinel_ids.add(first_id)
        done = engine.generate([hole], [SamplingParams(max_new_tokens=10)])[0]
        assert (done.text, done.finish_reason) == ("", "eos")
    with pytest.raises(NoInfill, match="without fill-in-the-middle"):
        Engine(tiny_checkpoint, num_threads=1).encode_prompt(hole, 20)


def test_a_psm_prompt_built_by_the_editor_is_read_back_as_prefix_and_suffix():
    from serving.engine.fim import Infill, parse_psm

    assert parse_psm("<fim_prefix>def f(x):\n    <fim_suffix>\n\nf(1)<fim_middle>") == Infill("def f(x):\n    ", "\n\nf(1)")
    assert parse_psm("<fim_prefix><fim_suffix><fim_middle>") == Infill("", "")
    for text in ("def f(x):", "<fim_prefix>a<fim_middle>", "x<fim_prefix>a<fim_suffix>b<fim_middle>",
                 "<fim_prefix>a<fim_suffix>b<fim_suffix>c<fim_middle>", "<fim_prefix>a<fim_suffix>b<fim_middle>c"):
        assert parse_psm(text) is None


def test_a_fim_prompt_with_almost_the_whole_context_to_generate_still_fits(tiny_fim_checkpoint):
    from serving.engine.engine import Engine, SamplingParams
    from serving.engine.fim import Infill

    engine = Engine(tiny_fim_checkpoint, num_threads=1)
    c = engine.generate([Infill("x = ", "\ny = 2\n")], [SamplingParams(max_new_tokens=127)])[0]
    assert c.prompt_tokens == 3 and c.completion_tokens <= 125  # the three sentinels + the rest of the context
