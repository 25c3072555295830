"""The generation engine: one batched, KV-cached decode loop with per-request sampling.

Why not `model.generate`: HF's `generate` applies one temperature / top-p / top-k and one
global RNG to the whole batch. A server batches requests that disagree on all of those, and
"same prompt + same seed + same parameters gives the same completion" must hold whatever
else shares the batch. So this loop does what `generate` does for a decoder-only model
(left padding, position ids from the attention mask, a DynamicCache, one forward pass per
step for the whole batch) and samples all rows at once, each with its own parameters and
seed (serving/engine/sampling.py). Rows that finish are dropped from the batch and the cache, so a
long request does not make short ones pay for its steps; a row whose sampling or decoding
fails ends alone, with an "error" Delta.

The loop itself is the DecodeLoop (serving/engine/scheduler.py), the one the service runs:
`generate` steps one on the caller's thread. The Engine holds the model and tokenizer and
the three steps the loop calls, `prefill`, `forward` and `sample`: attributes an engine
plugin may wrap (serving/engine/plugins.py). Output processing (detokenizing, stop strings,
holding text back) is serving/engine/output.py; logprobs are serving/engine/logprobs.py.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.engine.batch_state import BatchState
from serving.engine.fim import SENTINELS, Infill, read_fim
from serving.engine.gpt2_step import decoder_for
from serving.engine.logprobs import prompt_logprobs
from serving.engine.output import Row
from serving.engine.prompts import encode_prompt
from serving.engine.params import Completion, Delta, GenerationError, SamplingParams, TokenLogprob
from serving.engine.sampling import row_key, sample_rows
from serving.engine.scheduler import DecodeLoop


REQUIRED_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Set (to anything) to decode every step through the model's own forward instead of the
# written-out GPT-2 step: the benchmark's baseline, and a way out should the two ever differ.
HF_DECODE_ENV = "CODECOMPLETE_HF_DECODE"


class CheckpointError(ValueError):
    """The checkpoint folder is missing or is not a Hugging Face model folder."""


def check_checkpoint(path: str | os.PathLike) -> Path:
    """Fail early, naming the folder, when it is not a safetensors HF model + tokenizer."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r} is not a folder")
    missing = [f for f in REQUIRED_FILES if not (p / f).is_file()]
    if "model.safetensors" in missing and any(p.glob("model-*.safetensors")):
        missing.remove("model.safetensors")  # sharded safetensors are fine
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer.json")
    if missing:
        raise CheckpointError(
            f"checkpoint {str(p)!r} is not a model folder: missing {', '.join(missing)} "
            "(expected the training job's OUTPUT/model/: config.json, model.safetensors, tokenizer files)"
        )
    return p


def set_torch_threads(num_threads: Optional[int]) -> int:
    """Use the cores a replica was given; intra-op threads beyond real cores only thrash."""
    n = num_threads or int(os.environ.get("SERVE_TORCH_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


class Engine:
    """Tokenizer + causal LM from a Hugging Face folder, served batch by batch."""

    def __init__(self, checkpoint: str | os.PathLike, num_threads: Optional[int] = None,
                 model_name: Optional[str] = None):
        path = check_checkpoint(checkpoint)
        set_torch_threads(num_threads)
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # use_safetensors=True: never fall back to unpickling a .bin file.
        self.model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)
        self.model.eval()
        # The decode step written out for plain GPT-2s (serving/engine/gpt2_step.py); None: model(...).
        self.fast_step = None if os.environ.get(HF_DECODE_ENV) else decoder_for(self.model)
        self.eos_token_id: Optional[int] = self.tokenizer.eos_token_id
        self.pad_token_id: int = self.tokenizer.pad_token_id
        vocab = self.tokenizer.get_vocab()
        # fim.json with fim_rate > 0: the model can infill (a `suffix`); None otherwise.
        self.fim = read_fim(path, vocab)
        # A completion ends at end-of-text or any FIM sentinel (<fim_pad> ends a middle), and
        # never contains one.
        self.sentinel_ids = {i for i in (vocab.get(t) for t in SENTINELS) if i is not None}
        self.vocab_size: int = len(self.tokenizer)
        self._pieces: dict[int, str] = {}
        cfg = self.model.config
        self.context_length: int = int(getattr(cfg, "n_positions", None) or cfg.max_position_embeddings)
        # OUTPUT/model/ is named after its run folder (runs/tiny/model -> "tiny").
        self.model_name = model_name or (path.parent.name if path.name == "model" and path.parent.name else path.name)

    # ---- prompt handling -------------------------------------------------------------

    def encode_prompt(self, prompt: "str | Sequence[int] | Infill", max_new_tokens: int) -> tuple[list[int], bool]:
        """Token ids of the prompt, keeping its LAST tokens so prompt + new tokens fit.
        A prompt may be text, token ids, or an Infill (prefix + suffix: the FIM prompt)."""
        return encode_prompt(prompt, max_new_tokens, context_length=self.context_length, encode=self._encode,
                             fim=self.fim, model_name=self.model_name,
                             empty_id=self.eos_token_id if self.eos_token_id is not None else self.pad_token_id)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ---- what the decode loop calls (serving/engine/scheduler.py) ----------------------

    def start_rows(self, prompts: Sequence[Any], params: Sequence[SamplingParams],
                   incremental: Optional[Sequence[bool]] = None,
                   cancel: Optional[Sequence[Optional[threading.Event]]] = None) -> tuple[list[Row], list[list[int]]]:
        """Decode state and prompt ids per request (ValueError for an impossible request)."""
        assert len(prompts) == len(params) and prompts
        incremental = list(incremental) if incremental is not None else [True] * len(prompts)
        cancel = list(cancel) if cancel is not None else [None] * len(prompts)
        rows: list[Row] = []
        encoded: list[list[int]] = []
        for prompt, p, inc, stop in zip(prompts, params, incremental, cancel):
            if not (p.temperature >= 0 and 0 < p.top_p <= 1 and p.top_k >= 0 and p.repetition_penalty > 0
                    and 0 <= p.min_p <= 1 and 0 <= p.min_tokens):
                raise ValueError(f"invalid sampling parameters {p}")
            ids, truncated = self.encode_prompt(prompt, p.max_new_tokens)
            if len(ids) + p.max_new_tokens > self.context_length:  # a FIM prompt is never under 3 tokens
                p = replace(p, max_new_tokens=max(1, self.context_length - len(ids)))
            seed = p.seed if p.seed is not None else random.SystemRandom().randrange(2**64)
            rows.append(Row(params=p, prompt_tokens=len(ids), truncated=truncated, key=row_key(seed),
                            prompt=prompt, incremental=inc, cancel=stop, prompt_ids=ids))
            if p.prompt_logprobs is not None:
                rows[-1].prompt_lp = prompt_logprobs(self.model, ids, p.prompt_logprobs, self.piece)
            encoded.append(ids)
        return rows, encoded

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[BatchState, torch.Tensor]:
        """Run the prompts as a new batch: its state and each row's next-token logits."""
        return BatchState.prefill(self.model, prompts, self.pad_token_id, self.fast_step)

    def forward(self, state: BatchState, rows: Sequence[Row], next_ids: Sequence[int]) -> torch.Tensor:
        """One decode step of a running batch (`rows` are its rows, in order): next-token logits."""
        return state.step(self.model, next_ids, self.fast_step)

    def sample(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
        """Next token per row: penalties, then argmax for temperature 0, else seeded top-k /
        top-p sampling (serving/engine/sampling.py)."""
        return sample_rows(logits, rows, self.end_ids())

    def end_ids(self) -> set[int]:
        """The tokens that end a completion and never appear in one: end-of-text and the FIM
        sentinels (<fim_pad> ends a middle)."""
        return self.sentinel_ids | {self.eos_token_id} if self.eos_token_id is not None else self.sentinel_ids

    def tokenize(self, text: str) -> list[int]:
        return self._encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._decode(list(ids))

    def piece(self, token: int) -> str:
        """A token's text on its own (cached: logprobs name every alternative by its text)."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self._decode([token])
        return text

    # ---- conveniences ----------------------------------------------------------------

    def generate(self, prompts: Sequence[Any], params: Sequence[SamplingParams]) -> list[Completion]:
        """Run a batch to the end on this thread (the service's DecodeLoop, stepped here) and
        collect each request's completion."""
        texts = [""] * len(prompts)
        lps: list[list[TokenLogprob]] = [[] for _ in prompts]
        final: list[Optional[Delta]] = [None] * len(prompts)
        items: list[Any] = []
        loop = DecodeLoop(self, max_rows=len(prompts), threaded=False)
        loop.submit(prompts, params, [False] * len(prompts), items.append)
        loop.run_until_done()
        for item in items:
            if isinstance(item, BaseException):
                raise item
            for i, d in enumerate(item or ()):
                if d is not None:
                    texts[i] += d.text
                    lps[i] += d.logprobs
                    if d.finished:
                        final[i] = d
        out = []
        for t, d, lp in zip(texts, final, lps):
            assert d is not None
            if d.error:
                raise GenerationError(d.error)
            out.append(Completion(t, d.finish_reason or "length", d.prompt_tokens, d.completion_tokens, d.truncated,
                                  logprobs=lp, prompt_logprobs=d.prompt_logprobs))
        return out

    def complete(self, prompt: str, **kw) -> Completion:
        return self.generate([prompt], [SamplingParams(**kw)])[0]

    def warmup(self) -> float:
        """One short generation so the first real request does not pay for lazy init."""
        t = time.perf_counter()
        self.complete("def", max_new_tokens=2)
        return time.perf_counter() - t
