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
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.engine.batch_state import BatchState
from serving.engine.fim import SENTINELS, Infill, NoInfill, fim_prompt_ids, read_fim
from serving.engine.gpt2_step import decoder_for
from serving.engine.logprobs import apply_penalties, prompt_logprobs, step_logprobs
from serving.engine.params import Completion, Delta, GenerationError, SamplingParams, TokenLogprob
from serving.engine.sampling import greedy, row_key, sample, uniform

log = logging.getLogger(__name__)

REQUIRED_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Test-only fault injection: a request whose prompt contains this variable's value fails
# while it is sampled, so tests can check one failing request leaves its batch-mates alone.
# Unset (always, outside tests) it costs nothing.
TEST_FAULT_ENV = "CODECOMPLETE_TEST_FAULT_MARKER"


# Set (to anything) to decode every step through the model's own forward instead of the
# written-out GPT-2 step: the benchmark's baseline, and a way out should the two ever differ.
HF_DECODE_ENV = "CODECOMPLETE_HF_DECODE"


class CheckpointError(ValueError):
    """The checkpoint folder is missing or is not a Hugging Face model folder."""


@dataclass
class _Row:
    """Decode state of one request inside a running batch."""

    params: SamplingParams
    prompt_tokens: int
    truncated: bool
    key: int  # the request's seed, hashed: its random stream is sampling.uniform(key, step)
    tokens: list[int] = field(default_factory=list)  # the completion's tokens (eos excluded)
    generated: int = 0  # tokens sampled, eos included: what usage reports, as vLLM does
    emitted: int = 0  # characters of the completion already handed out
    done: bool = False
    incremental: bool = True  # hand out text step by step (streaming) or only at the end
    cancel: Optional[threading.Event] = None  # set when the client went away: the row leaves
    fault: str = ""  # test-only: "sample" or "forward" raises there for this row (see TEST_FAULT_ENV)
    error: Optional[str] = None  # why this row failed
    lp: list[TokenLogprob] = field(default_factory=list)  # one per completion token, if asked
    lp_sent: int = 0  # entries of lp already handed out
    prompt_lp: Optional[list[TokenLogprob]] = None  # the prompt's tokens scored (echo), if asked


class _Draws(Sequence[float]):
    """The rows' uniform draws for this step, each computed only when the sampler asks for it
    (a row whose best token carries top_p needs none)."""

    def __init__(self, rows: Sequence[_Row]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, b):  # type: ignore[override]
        row = self.rows[b]
        return uniform(row.key, row.generated)


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
        self._fault_marker: Optional[str] = os.environ.get(TEST_FAULT_ENV) or None

    # ---- prompt handling -------------------------------------------------------------

    def encode_prompt(self, prompt: "str | Sequence[int] | Infill", max_new_tokens: int) -> tuple[list[int], bool]:
        """Token ids of the prompt, keeping its LAST tokens so prompt + new tokens fit.
        A prompt may be text, token ids, or an Infill (prefix + suffix: the FIM prompt)."""
        if not 1 <= max_new_tokens <= self.context_length - 1:
            raise ValueError(f"max_new_tokens must be in [1, {self.context_length - 1}]")
        budget = self.context_length - max_new_tokens
        if isinstance(prompt, Infill):
            if self.fim is None:
                raise NoInfill(f"model {self.model_name!r} was trained without fill-in-the-middle "
                               "(no fim.json with fim_rate > 0): it cannot complete with a suffix")
            return fim_prompt_ids(self._encode(prompt.prefix), self._encode(prompt.suffix), self.fim, budget)
        ids = self._encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) > budget:
            return ids[-budget:], True
        if not ids:  # only possible for "" which the API rejects; keep the loop well-defined
            ids = [self.eos_token_id if self.eos_token_id is not None else self.pad_token_id]
        return ids, False

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ---- the decode loop -------------------------------------------------------------

    def start_rows(self, prompts: Sequence[str], params: Sequence[SamplingParams],
                   incremental: Optional[Sequence[bool]] = None,
                   cancel: Optional[Sequence[Optional[threading.Event]]] = None) -> tuple[list[_Row], list[list[int]]]:
        """Decode state and prompt ids per request (ValueError for an impossible request)."""
        assert len(prompts) == len(params) and prompts
        incremental = list(incremental) if incremental is not None else [True] * len(prompts)
        cancel = list(cancel) if cancel is not None else [None] * len(prompts)
        rows: list[_Row] = []
        encoded: list[list[int]] = []
        for prompt, p, inc, stop in zip(prompts, params, incremental, cancel):
            if not (p.temperature >= 0 and 0 < p.top_p <= 1 and p.top_k >= 0):
                raise ValueError(f"invalid sampling parameters {p}")
            ids, truncated = self.encode_prompt(prompt, p.max_new_tokens)
            if len(ids) + p.max_new_tokens > self.context_length:  # a FIM prompt is never under 3 tokens
                p = replace(p, max_new_tokens=max(1, self.context_length - len(ids)))
            seed = p.seed if p.seed is not None else random.SystemRandom().randrange(2**64)
            rows.append(_Row(params=p, prompt_tokens=len(ids), truncated=truncated, key=row_key(seed),
                             incremental=inc, cancel=stop,
                             fault=self._fault_of(prompt)))
            if p.prompt_logprobs is not None:
                rows[-1].prompt_lp = prompt_logprobs(self.model, ids, p.prompt_logprobs, self.piece)
            encoded.append(ids)
        return rows, encoded

    def stream_batch(self, prompts: Sequence[str], params: Sequence[SamplingParams],
                     incremental: Optional[Sequence[bool]] = None) -> Iterator[list[Optional[Delta]]]:
        """Decode one fixed batch; yield, once per step, one entry per request: its new Delta or None.

        None means "nothing new this step" (text held back, or the request already ended).
        Each request ends with exactly one Delta whose `finished` is True. A request marked
        not `incremental` gets all its text in that final Delta (and skips per-step decoding
        unless it has stop strings to watch for). The server's DecodeLoop (scheduler.py) runs
        the same steps but lets requests join a batch that is already decoding.
        """
        rows, encoded = self.start_rows(prompts, params, incremental)
        state, logits = BatchState.prefill(self.model, encoded, self.pad_token_id, self.fast_step)
        active = list(range(len(rows)))  # batch row -> request index
        while True:
            next_ids, deltas, keep = self.advance([rows[r] for r in active], logits)
            step: list[Optional[Delta]] = [None] * len(rows)
            for b, r in enumerate(active):
                step[r] = deltas[b]
            yield step
            if not keep:
                return
            if len(keep) < len(active):  # drop finished rows from the batch and the cache
                state.keep(keep)
                active, next_ids = [active[b] for b in keep], [next_ids[b] for b in keep]
            logits = state.step(self.model, next_ids, self.fast_step)

    def advance(self, rows: Sequence[_Row], logits: torch.Tensor,
                timings: Optional[dict[str, float]] = None) -> tuple[list[int], list[Optional[Delta]], list[int]]:
        """One step for a batch's rows: (sampled ids, each row's Delta or None, batch indices
        of the rows that go on). A row whose sampling or decoding raises ends with an "error"
        Delta; the other rows are not affected. `timings` adds up sample_s, sample_cpu_s (the
        thread's CPU time) and text_s."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            next_ids = self._sample(logits, rows)
        except Exception:  # find the culprit: sample row by row (draws are stateless, so rows repeat exactly)
            next_ids = []
            for b, row in enumerate(rows):
                try:
                    next_ids.append(self._sample(logits[b:b + 1], [row])[0])
                except Exception as e:
                    self._fail(row, e)
                    next_ids.append(self.pad_token_id)
        t1, c1 = time.perf_counter(), time.thread_time()
        deltas: list[Optional[Delta]] = []
        try:
            entries = step_logprobs(logits, [r.params for r in rows], next_ids, self.piece)
        except Exception:  # only rows that asked for logprobs can fail here; they fail below
            entries = [None] * len(rows)
        for row, token, entry in zip(rows, next_ids, entries):
            if row.done:  # failed while sampling
                deltas.append(self._failure(row))
                continue
            try:
                if row.params.logprobs is not None and entry is None:
                    raise RuntimeError("computing logprobs failed")
                deltas.append(self._advance(row, token, entry))
            except Exception as e:
                deltas.append(self.fail(row, e))
        if timings is not None:
            timings["sample_s"] += t1 - t0
            timings["sample_cpu_s"] += c1 - c0
            timings["text_s"] += time.perf_counter() - t1
        return next_ids, deltas, [b for b, row in enumerate(rows) if not row.done]

    def _sample(self, logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
        """Next token per row: argmax for temperature 0, else seeded top-k / top-p sampling (sampling.py)."""
        if self._fault_marker and any(row.fault == "sample" for row in rows):
            raise RuntimeError("injected test fault (" + TEST_FAULT_ENV + ")")
        logits = apply_penalties(logits, [r.params for r in rows], [r.tokens for r in rows])
        sampled = [b for b, row in enumerate(rows) if row.params.temperature > 0]
        if not sampled:
            return greedy(logits)
        picked_rows = [rows[b] for b in sampled]
        x = logits if len(sampled) == len(rows) else logits[torch.tensor(sampled)]
        picked = sample(x, [r.params.temperature for r in picked_rows], [r.params.top_k for r in picked_rows],
                        [r.params.top_p for r in picked_rows], _Draws(picked_rows))
        if len(sampled) == len(rows):
            return picked
        choice = greedy(logits)
        for b, token in zip(sampled, picked):
            choice[b] = token
        return choice

    def _fault_of(self, prompt: Any) -> str:
        """Test-only: a prompt holding the marker fails while sampling, or with the marker
        followed by "forward", in every decode forward pass it takes part in."""
        if not (self._fault_marker and isinstance(prompt, str) and self._fault_marker in prompt):
            return ""
        return "forward" if self._fault_marker + "forward" in prompt else "sample"

    def check_forward(self, rows: Sequence[_Row]) -> None:
        """Test-only: raise if an injected forward-pass fault rides in this batch."""
        if self._fault_marker and any(row.fault == "forward" for row in rows):
            raise RuntimeError("injected test fault in the forward pass (" + TEST_FAULT_ENV + ")")

    def fail(self, row: _Row, e: BaseException) -> Delta:
        """End one row with an error of its own; returns its final Delta."""
        self._fail(row, e)
        return self._failure(row)

    def _fail(self, row: _Row, e: BaseException) -> None:
        log.error("decoding one request failed; its batch goes on", exc_info=e)
        row.done, row.error = True, f"{type(e).__name__}: {e}"

    @staticmethod
    def _failure(row: _Row) -> Delta:
        return Delta("", True, "error", row.prompt_tokens, row.generated, row.truncated, error=row.error)

    def _advance(self, row: _Row, token: int, entry: Optional[TokenLogprob] = None) -> Optional[Delta]:
        """Append a token to a row; return the text it may release now, and the verdict if done."""
        p = row.params
        reason: Optional[str] = None
        row.generated += 1
        if token == self.eos_token_id or token in self.sentinel_ids:
            # End-of-text / a FIM sentinel is never part of the completion; it ends it
            # unless the request ignores it (then the row decodes on to its length).
            reason = None if p.ignore_eos else "eos"
        else:
            row.tokens.append(token)
            if entry is not None:
                row.lp.append(entry)
        if not (row.incremental or p.stop or reason or row.generated >= p.max_new_tokens):
            return None  # nothing to show or check yet: skip decoding
        text = self._decode(row.tokens)
        if p.stop:
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        if reason is None and row.generated >= p.max_new_tokens:
            reason = "length"
        if reason is None and not row.incremental:
            return None
        if reason is not None:
            row.done = True
            new, row.emitted = text[row.emitted:], len(text)
            return Delta(new, True, reason, row.prompt_tokens, row.generated, row.truncated,
                         logprobs=self._release(row, len(text), everything=reason != "stop"),
                         prompt_logprobs=row.prompt_lp)
        # Hold back what may still change: a half-decoded UTF-8 character, or a tail that
        # could be the start of a stop string (the client must never see a stop string).
        safe = len(text)
        while safe > row.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        held = text[:safe]
        for s in p.stop:
            for k in range(min(len(s) - 1, len(held)), 0, -1):
                if held.endswith(s[:k]):
                    safe = min(safe, len(held) - k)
                    break
        if safe <= row.emitted:
            return None
        new, row.emitted = text[row.emitted:safe], safe
        return Delta(new, logprobs=self._release(row, safe))

    def _release(self, row: _Row, upto: int, everything: bool = False) -> list[TokenLogprob]:
        """The logprob entries of the tokens whose text starts before character `upto` of the
        completion (all of them when the row ended other than by a stop string)."""
        if not row.lp:
            return []
        end = len(row.lp)
        if not everything:
            end = row.lp_sent
            while end < len(row.lp) and len(self._decode(row.tokens[:end])) < upto:
                end += 1
        out, row.lp_sent = row.lp[row.lp_sent:end], max(row.lp_sent, end)
        return out

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

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]) -> list[Completion]:
        """Run a batch to the end and collect each request's completion."""
        texts = [""] * len(prompts)
        lps: list[list[TokenLogprob]] = [[] for _ in prompts]
        final: list[Optional[Delta]] = [None] * len(prompts)
        for step in self.stream_batch(prompts, params, incremental=[False] * len(prompts)):
            for i, d in enumerate(step):
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
