"""Perplexity as a Ray Data job agrees with the model's own loss on the same chunks."""

from __future__ import annotations


import numpy as np
import pytest
import torch

pytestmark = pytest.mark.timeout(900)  # the first user also pays for the session tiny_checkpoint


def _chunks(checkpoint, n: int = 12, length: int = 128) -> np.ndarray:
    """Real code, tokenized with the checkpoint's tokenizer, cut into full chunks."""
    from tests.support.corpus import stdlib_files
    from training.data.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    ids: list[int] = []
    for f in stdlib_files(80)[60:]:  # files the tiny model was not trained on
        ids += tok(f.read_text(encoding="utf-8"))["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n * length:
            break
    return np.array(ids[: n * length], dtype=np.int32).reshape(n, length)


def test_ignored_labels_are_not_counted(tiny_checkpoint):
    # The actor's scoring function itself (what each pool member runs), without a pool.
    from transformers import AutoModelForCausalLM

    from training.eval.perplexity import LossScorer

    chunks = _chunks(tiny_checkpoint, n=4)
    labels = chunks.astype(np.int64).copy()
    labels[:, 64:] = -100  # e.g. padding: the second half is not scored
    out = LossScorer(str(tiny_checkpoint))({"input_ids": chunks, "labels": labels})
    assert out["tokens"].tolist() == [63] * 4
    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint)).eval()
    ids, lab = torch.as_tensor(chunks, dtype=torch.long), torch.as_tensor(labels)
    with torch.no_grad():
        want = model(input_ids=ids, labels=lab).loss.item()
    assert out["loss_sum"].sum() / out["tokens"].sum() == pytest.approx(want, rel=1e-5)
