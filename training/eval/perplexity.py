"""Validation loss and perplexity of a checkpoint, as a Ray Data job.

The held-out chunks come from the training data stage (`training.data.pipeline.chunk_dataset`:
same reading, filtering, tokenizer and chunking as training), an actor pool scores them (each
actor loads the model once), and the driver adds up summed loss and token counts.

Loss is the token-weighted mean next-token cross-entropy, exactly what
`model(input_ids, labels=input_ids).loss` computes over the same tokens in one batch (the
first token of each chunk has no prediction; labels of -100 are ignored); perplexity = exp(loss).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np


class LossScorer:
    """A Ray Data actor: per-chunk summed next-token loss and the number of scored tokens."""

    def __init__(self, checkpoint: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint).to(device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        ids = torch.as_tensor(np.stack(batch["input_ids"]).astype(np.int64), device=self.device)
        labels = ids if "labels" not in batch else \
            torch.as_tensor(np.stack(batch["labels"]).astype(np.int64), device=self.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits.float()
        # Position t predicts token t+1, as in the model's own loss.
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target,
                                                ignore_index=-100, reduction="none")
        mask = target != -100
        return {"loss_sum": (nll * mask).sum(dim=1).double().cpu().numpy(),
                "tokens": mask.sum(dim=1).cpu().numpy().astype(np.int64)}


def evaluate_loss(ds, checkpoint: str | Path, workers: int = 1, batch_size: int = 16,
                  max_chunks: Optional[int] = None) -> dict:
    """Loss/perplexity of `checkpoint` on a Dataset of `input_ids` (and optional `labels`) rows.

    Needs Ray initialized. Returns {"loss", "perplexity", "tokens", "chunks"}.
    """
    import ray

    if max_chunks is not None:
        ds = ds.limit(max_chunks)
    use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    scored = ds.map_batches(LossScorer, batch_size=batch_size,
                            fn_constructor_kwargs={"checkpoint": str(checkpoint),
                                                   "device": "cuda" if use_gpu else "cpu"},
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=1, num_gpus=1 if use_gpu else 0)
    # Two numbers per chunk: summing them in the driver is cheaper than a Ray shuffle-aggregate.
    loss_sum, tokens, chunks = 0.0, 0, 0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        loss_sum += float(batch["loss_sum"].sum())
        tokens += int(batch["tokens"].sum())
        chunks += len(batch["tokens"])
    if tokens == 0:
        raise ValueError("the evaluation corpus produced no chunks to score (too small, or every "
                         "file shorter than the context length)")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "chunks": chunks}
