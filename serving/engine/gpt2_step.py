"""One KV-cached decode step of a GPT-2, written out: what the decode loop runs every step.

Why not `model(...)`: for the small models this project trains, a decode step is a few
small matrix products per layer, and Hugging Face's per-call machinery (building a 4-D
causal mask from the 2-D one, the cache object's bookkeeping, output dataclasses, kwargs
plumbing) costs as much as the arithmetic. This module runs the same arithmetic on the same
weights and the same cache tensors (BatchState's DynamicCache), so prefill, merge and keep
stay Hugging Face's, and a row's logits match the model's own forward (tests/unit/engine/test_gpt2_step.py
holds them to it).

Only the plain GPT-2 block is written out; a model with any other attention variant gets
`None` from `decoder_for` and decodes through `model(...)` as before.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def decoder_for(model) -> Optional["GPT2Step"]:
    """A GPT2Step for a plain Hugging Face GPT-2 (eval mode, no dropout at inference), else None."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "gpt2":
        return None
    if (getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False)
            or not getattr(cfg, "scale_attn_weights", True) or getattr(cfg, "add_cross_attention", False)
            or cfg.activation_function not in _ACTIVATIONS):
        return None
    return GPT2Step(model)


class GPT2Step:
    def __init__(self, model):
        cfg = model.config
        self.wte, self.wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        self.blocks = list(model.transformer.h)
        self.ln_f = model.transformer.ln_f
        self.head = model.lm_head.weight  # tied to wte in GPT-2; read through the module either way
        self.head_bias = getattr(model.lm_head, "bias", None)
        self.n_head, self.d = cfg.n_head, cfg.n_embd
        self.head_dim = self.d // self.n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.eps = cfg.layer_norm_epsilon
        self.act = _ACTIVATIONS[cfg.activation_function]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                cache) -> torch.Tensor:
        """Left-padded prompts [rows, width] into an empty DynamicCache; returns the logits of
        each row's last column [rows, vocab] (the only ones the decode loop uses)."""
        rows, width = input_ids.shape
        d, h, hd = self.d, self.n_head, self.head_dim
        x = F.embedding(input_ids, self.wte) + F.embedding(positions, self.wpe)  # [rows, width, d]
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        # A query sees the real tokens up to itself. A padding query would see nothing, and
        # softmax over nothing is NaN, which would reach the cache: it sees itself instead
        # (its output is never used, and no real token attends to it).
        mask = (causal & attention.bool()[:, None, :]) | torch.eye(width, dtype=torch.bool)
        mask = mask[:, None]  # [rows, 1, width, width]
        for i, block in enumerate(self.blocks):
            a = F.layer_norm(x, (d,), block.ln_1.weight, block.ln_1.bias, self.eps)
            qkv = torch.addmm(block.attn.c_attn.bias, a.view(-1, d), block.attn.c_attn.weight)
            q, k, v = (t.view(rows, width, h, hd).transpose(1, 2) for t in qkv.split(d, dim=1))
            cache.update(k, v, i)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            y = y.transpose(1, 2).reshape(rows * width, d)
            x = x + torch.addmm(block.attn.c_proj.bias, y, block.attn.c_proj.weight).view(rows, width, d)
            a = F.layer_norm(x, (d,), block.ln_2.weight, block.ln_2.bias, self.eps)
            a = self.act(torch.addmm(block.mlp.c_fc.bias, a.view(-1, d), block.mlp.c_fc.weight))
            x = x + torch.addmm(block.mlp.c_proj.bias, a, block.mlp.c_proj.weight).view(rows, width, d)
        last = F.layer_norm(x[:, -1], (d,), self.ln_f.weight, self.ln_f.bias, self.eps)
        return F.linear(last, self.head, self.head_bias).float()

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, attention: torch.Tensor, cache) -> torch.Tensor:
        """ids, positions: [rows] (each row's newest token and its position id); attention:
        [rows, width] with the newest column included; cache: a DynamicCache holding `width - 1`
        columns per layer, which this step extends by one. Returns next-token logits [rows, vocab]."""
        rows, d, h, hd = ids.shape[0], self.d, self.n_head, self.head_dim
        x = F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)  # [rows, d]
        mask = attention.bool()[:, None, None, :]  # [rows, 1, 1, width]: which columns a row sees
        for block, layer in zip(self.blocks, cache.layers):
            a = F.layer_norm(x, (d,), block.ln_1.weight, block.ln_1.bias, self.eps)
            qkv = torch.addmm(block.attn.c_attn.bias, a, block.attn.c_attn.weight)  # HF Conv1D: x @ W + b
            q, k, v = (t.view(rows, 1, h, hd).transpose(1, 2) for t in qkv.split(d, dim=1))
            layer.keys, layer.values = _append(layer, "keys", k), _append(layer, "values", v)
            y = F.scaled_dot_product_attention(q, layer.keys, layer.values, attn_mask=mask, scale=self.scale)
            x = x + torch.addmm(block.attn.c_proj.bias, y.reshape(rows, d), block.attn.c_proj.weight)
            a = F.layer_norm(x, (d,), block.ln_2.weight, block.ln_2.bias, self.eps)
            a = self.act(torch.addmm(block.mlp.c_fc.bias, a, block.mlp.c_fc.weight))
            x = x + torch.addmm(block.mlp.c_proj.bias, a, block.mlp.c_proj.weight)
        x = F.layer_norm(x, (d,), self.ln_f.weight, self.ln_f.bias, self.eps)
        return F.linear(x, self.head, self.head_bias).float()


SPARE_COLUMNS = 32  # room for this many more steps after a buffer is (re)allocated


def _append(layer, name: str, col: torch.Tensor) -> torch.Tensor:
    """The layer's keys or values [rows, heads, width, head_dim] with `col` [rows, heads, 1,
    head_dim] appended as the newest column.

    Written in place when they are a view into a buffer this function allocated for the layer
    and the buffer has room after them: torch.cat would copy the whole cache every step, which
    with many rows in flight costs more than the attention that reads it. Otherwise (the first step, or after a
    merge or keep, which copy the cache) they move into a new buffer with SPARE_COLUMNS free
    columns. Views already handed out stay valid: columns are only ever written past their
    end, so the state a failed step rolls back to is untouched."""
    t = getattr(layer, name)
    rows, heads, width, dim = t.shape
    room = getattr(layer, "_room_" + name, None)
    start = _start_in(room, t) if room is not None else None
    if start is not None and start + width < room.shape[2]:
        room[:, :, start + width] = col[:, :, 0]
        return room[:, :, start:start + width + 1]
    room = t.new_empty((rows, heads, width + 1 + SPARE_COLUMNS, dim))
    room[:, :, :width] = t
    room[:, :, width] = col[:, :, 0]
    setattr(layer, "_room_" + name, room)
    return room[:, :, :width + 1]


def _start_in(room: torch.Tensor, t: torch.Tensor) -> Optional[int]:
    """The column where `t` starts if it is room[:, :, start:start + width], else None."""
    if (t.dtype != room.dtype or t.shape[0] != room.shape[0] or t.shape[1] != room.shape[1]
            or t.shape[3] != room.shape[3] or t.stride() != room.stride()
            or t.untyped_storage().data_ptr() != room.untyped_storage().data_ptr()):
        return None
    offset = t.storage_offset() - room.storage_offset()
    column = room.stride(2)
    if offset < 0 or offset % column or offset // column >= room.shape[2]:
        return None
    return offset // column

