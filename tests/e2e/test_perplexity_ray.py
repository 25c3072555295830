"""Perplexity as a Ray Data job agrees with the model's own loss on the same chunks."""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.corpus import held_out_chunks

pytestmark = pytest.mark.timeout(900)  # the first user also pays for the session tiny_checkpoint


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from training.ray_utils import init_ray

    init_ray()
    yield
    ray.shutdown()


def test_perplexity_matches_direct_model_loss(tiny_checkpoint, ray_local):
    import ray
    from transformers import AutoModelForCausalLM

    from training.eval.perplexity import evaluate_loss

    chunks = held_out_chunks(tiny_checkpoint)
    # Uneven batches and blocks on purpose: the token-weighted sum must not depend on them.
    ds = ray.data.from_items([{"input_ids": c.tolist(), "labels": c.tolist()} for c in chunks],
                             override_num_blocks=3)
    got = evaluate_loss(ds, tiny_checkpoint, workers=1, batch_size=5)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint)).eval()
    ids = torch.as_tensor(chunks, dtype=torch.long)
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids).loss.item()
    assert got["chunks"] == len(chunks)
    assert got["tokens"] == len(chunks) * 127  # the first token of each chunk has no prediction
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    # A trained model beats uniform guessing over its vocabulary.
    assert got["perplexity"] < model.config.vocab_size


def test_empty_corpus_is_a_clear_error(tiny_checkpoint, ray_local):
    import ray

    from training.eval.perplexity import evaluate_loss

    ds = ray.data.from_items([{"input_ids": [1] * 128}]).filter(lambda r: False)
    with pytest.raises(ValueError, match="no chunks"):
        evaluate_loss(ds, tiny_checkpoint)
