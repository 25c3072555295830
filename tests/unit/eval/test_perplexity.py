"""The perplexity scorer (what each Ray Data actor runs) agrees with the model's own loss; labels of -100 do not count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support.corpus import held_out_chunks

pytestmark = pytest.mark.timeout(900)  # the first user also pays for the session tiny_checkpoint


def test_ignored_labels_are_not_counted(tiny_checkpoint):
    # The actor's scoring function itself (what each pool member runs), without a pool.
    from transformers import AutoModelForCausalLM

    from training.eval.perplexity import LossScorer

    chunks = held_out_chunks(tiny_checkpoint, n=4)
    labels = chunks.astype(np.int64).copy()
    labels[:, 64:] = -100  # e.g. padding: the second half is not scored
    out = LossScorer(str(tiny_checkpoint))({"input_ids": chunks, "labels": labels})
    assert out["tokens"].tolist() == [63] * 4
    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint)).eval()
    ids, lab = torch.as_tensor(chunks, dtype=torch.long), torch.as_tensor(labels)
    with torch.no_grad():
        want = model(input_ids=ids, labels=lab).loss.item()
    assert out["loss_sum"].sum() / out["tokens"].sum() == pytest.approx(want, rel=1e-5)
