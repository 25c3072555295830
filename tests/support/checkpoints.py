"""A tiny real checkpoint: a GPT-2 trained for a few dozen steps with plain torch on stdlib code,
saved as a Hugging Face folder (safetensors + tokenizer, and fim.json when it learned FIM)
exactly as the training job saves one. The tests and benchmarks/serve.py (without a trained
model) both build theirs here."""

from __future__ import annotations

from pathlib import Path

from tests.support.corpus import stdlib_files


def train_tiny(out: Path, fim_rate: float, start: Path | None = None, *, files: int = 60,
               vocab_size: int = 1000, n_embd: int = 64, steps: int | None = None,
               fim_tokens: bool = False) -> Path:
    """Train and save the checkpoint. The defaults are the tests' model (2 x 64, vocab 1,000,
    60 steps; 30 more from `start` when it learns FIM); benchmarks/serve.py asks for the tiny
    preset's shape (n_embd 128, vocab 8,000) when no trained model is at hand."""
    import numpy as np
    import torch

    from training.config import DataConfig, ModelConfig
    from training.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
    from training.train.model import build_model

    texts = [f.read_text(encoding="utf-8") for f in stdlib_files(files)]
    data = DataConfig(vocab_size=vocab_size, context_length=128)
    torch.manual_seed(0)
    if start is None:
        # End-of-text only, as before FIM existed: the left-to-right checkpoint stays the one
        # the serving tests were written against, and is an "older model" that cannot infill.
        tok = train_tokenizer(texts, vocab_size=data.vocab_size, context_length=data.context_length,
                              fim_tokens=fim_tokens)
        model = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=n_embd, dropout=0.0), data, tok)
    else:
        from transformers import GPT2LMHeadModel

        from training.data.tokenizer import FIM_TOKENS

        tok, model = load_tokenizer(start), GPT2LMHeadModel.from_pretrained(str(start))
        tok.add_special_tokens({"additional_special_tokens": list(FIM_TOKENS)})
        model.resize_token_embeddings(len(tok))
    ids = torch.tensor([i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]])
    n = (len(ids) // 128) * 128
    chunks = labels = ids[:n].view(-1, 128)
    if fim_rate > 0:
        from training.data.fim import codec_from_file, fim_chunks
        from training.fim_format import write_fim_metadata

        save_tokenizer(tok, out)
        codec, fim = codec_from_file(str(out / "tokenizer.json"), lambda s: tok(s)["input_ids"])
        inputs, targets = fim_chunks(chunks.numpy().astype(np.int32), 0, codec, fim, fim_rate, 0.5)
        chunks, labels = torch.as_tensor(inputs, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps or (60 if start is None else 30)):
        pick = torch.randint(len(chunks), (16,), generator=g)
        loss = model(input_ids=chunks[pick], labels=labels[pick]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tok, out)
    if fim_rate > 0:
        write_fim_metadata(out, fim_rate, 0.5)
    return out
