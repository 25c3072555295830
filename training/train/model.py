"""The model: GPT-2 from scratch, shaped by the config and sized to the tokenizer.

Exactly the course's construction: `AutoConfig.from_pretrained("gpt2", ...)` with the
vocabulary, context and special-token ids overridden. "gpt2"'s config cannot be fetched
here, so the same settings are spelled out with `GPT2Config` (its defaults *are* GPT-2's).
"""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from training.config import DataConfig, ModelConfig


def gpt2_config(model: ModelConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=data.context_length,
        n_ctx=data.context_length,
        n_layer=model.n_layer,
        n_head=model.n_head,
        n_embd=model.n_embd,
        resid_pdrop=model.dropout,
        embd_pdrop=model.dropout,
        attn_pdrop=model.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(model: ModelConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(gpt2_config(model, data, tokenizer))


def count_parameters(model: GPT2LMHeadModel) -> int:
    # Tied input/output embeddings are one tensor: count unique storage once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
