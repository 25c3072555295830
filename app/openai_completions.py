"""POST /v1/completions (OpenAI's legacy completions API, as vLLM implements it), and
POST /tokenize, /detokenize.

What a request becomes: one job per (prompt, sample). `n` samples per prompt (seeds
seed, seed+1, ...: samples must differ), or `best_of` candidates of which the `n` with the
highest cumulative logprob are returned (vLLM's rule). A `suffix` turns a text prompt into
a fill-in-the-middle request (serving/engine/fim.py builds the prompt; only the middle comes back).
`echo` puts the prompt before the completion, and with `logprobs` scores the prompt's
tokens too; with `max_tokens` 0 nothing is generated: the prompt is only scored.
`text_offset` counts characters from the start of the choice's text.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Sequence

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from app.admission import AdmissionGate, GatedStreamingResponse
from app.backend import SSE_HEADERS, Prompt, check_new_tokens, check_suffix, collect, deltas, sse
from app.errors import APIError, failure_body
from app.schemas import (CompletionChoice, CompletionRequest, CompletionResponse, CompletionUsage,
                         DetokenizeRequest, DetokenizeResponse, Logprobs, TokenizeRequest, TokenizeResponse)
from serving.engine.params import Delta, Infill, SamplingParams, TokenLogprob, parse_psm


@dataclass
class Job:
    prompt_index: int
    prompt: Prompt
    params: SamplingParams
    echo: Optional[str] = None  # the prompt's text, put before the completion
    score_only: bool = False  # max_tokens 0 with echo: the generated token is dropped
    index: int = 0  # the choice index (set after best_of ranking)
    text: str = ""
    final: Optional[Delta] = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def plan(req: CompletionRequest, backend: Any) -> list[Job]:
    """The jobs of a request, in choice order (before best_of ranking); 4xx naming the field
    for what cannot be served."""
    echo, max_tokens = bool(req.echo), _or(req.max_tokens, 16)
    best_of = max(_or(req.best_of, 1), req.n)  # below n it is n
    if _or(req.best_of, 1) > 1 and req.stream:
        raise APIError(400, "best_of: not supported when streaming (stream=true)", "best_of")
    if _or(req.best_of, 1) > 1 and echo:
        raise APIError(400, "best_of: cannot be combined with echo", "best_of")
    if req.suffix is not None:
        if echo:
            raise APIError(400, "suffix: cannot be combined with echo", "suffix")
        check_suffix(backend, req.suffix)
    check_new_tokens(max(1, max_tokens), backend.context_length, "max_tokens")
    bad_stops = [t for t in req.stop_token_ids or () if not t < backend.vocab_size]
    if bad_stops:
        raise APIError(400, f"stop_token_ids: token id {bad_stops[0]} is outside the vocabulary "
                            f"[0, {backend.vocab_size})", "stop_token_ids")
    jobs: list[Job] = []
    for i, prompt in enumerate(req.prompts()):
        text: Optional[str] = None
        if isinstance(prompt, list):
            bad_ids = [t for t in prompt if not 0 <= t < backend.vocab_size]
            if bad_ids:
                raise APIError(400, f"prompt: token id {bad_ids[0]} is outside the vocabulary "
                                    f"[0, {backend.vocab_size})", "prompt")
            if echo or req.suffix is not None:
                text = backend.detokenize(prompt)
        else:
            text = prompt
        what: Prompt = prompt
        if req.suffix is not None and backend.can_infill:
            what = Infill(str(text), req.suffix)
        elif isinstance(prompt, str) and backend.can_infill and not echo:
            what = parse_psm(prompt) or prompt  # a FIM prompt the editor built (Continue)
        for j in range(best_of):
            seed = None if req.seed is None else req.seed + j  # samples must differ
            params = SamplingParams(
                max_new_tokens=max(1, max_tokens), temperature=_or(req.temperature, 1.0), top_p=_or(req.top_p, 1.0),
                top_k=req.top_k, stop=tuple(req.stops()), seed=seed, ignore_eos=req.ignore_eos,
                # best_of ranks by cumulative logprob: ask for it even if the client did not
                logprobs=req.logprobs if req.logprobs is not None else (0 if best_of > req.n else None),
                prompt_logprobs=req.logprobs if echo and req.logprobs is not None else None,
                presence_penalty=_or(req.presence_penalty, 0.0), frequency_penalty=_or(req.frequency_penalty, 0.0),
                repetition_penalty=_or(req.repetition_penalty, 1.0), min_p=_or(req.min_p, 0.0),
                min_tokens=min(req.min_tokens, max(1, max_tokens)), stop_token_ids=tuple(req.stop_token_ids or ()),
                include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens)
            jobs.append(Job(i, what, params, echo=text if echo else None, score_only=max_tokens == 0))
    return jobs


def logprobs_of(entries: Sequence[TokenLogprob], start: int = 0) -> Logprobs:
    offsets, pos = [], start
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return Logprobs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                    top_logprobs=[e.top for e in entries], text_offset=offsets)


def openai_reason(d: Delta) -> str:
    return "length" if d.finish_reason == "length" else "stop"  # OpenAI folds eos into "stop"


def register(app: FastAPI, backend: Any, auth: list, gate: AdmissionGate, responses: Optional[dict] = None) -> None:
    @app.post("/v1/completions", dependencies=auth, response_model=CompletionResponse, responses=responses)
    async def completions(req: CompletionRequest):
        if req.model != backend.model_name:
            raise APIError(404, f"model '{req.model}' does not exist; this server serves "
                                f"'{backend.model_name}' (see GET /v1/models)", "model")
        jobs = plan(req, backend)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        usage = bool(req.stream_options and req.stream_options.include_usage)
        ticket = gate.enter(len(jobs))  # 503 + Retry-After at once when the replica is full
        if req.stream and not (req.echo and req.logprobs is not None):
            for k, job in enumerate(jobs):
                job.index = k
            return GatedStreamingResponse(_events(backend, jobs, rid, created, usage, req.logprobs is not None),
                                          ticket, media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            results = await asyncio.gather(*(collect(backend, j.prompt, j.params, with_logprobs=True) for j in jobs))
        finally:
            ticket.release()
        for job, (text, final, lps) in zip(jobs, results):
            job.text, job.final, job.logprobs = text, final, lps
        chosen = _rank(jobs, req.n)
        choices = [_choice(j, req.logprobs is not None) for j in chosen]
        prompt_tokens = sum(j.final.prompt_tokens for j in {j.prompt_index: j for j in jobs}.values())
        completion_tokens = sum(0 if j.score_only else j.final.completion_tokens for j in jobs)
        body = CompletionResponse(id=rid, created=created, model=backend.model_name, choices=choices,
                                  usage=CompletionUsage(prompt_tokens=prompt_tokens,
                                                        completion_tokens=completion_tokens,
                                                        total_tokens=prompt_tokens + completion_tokens))
        if req.stream:  # echo + logprobs: the prompt's logprobs exist only once the prompt is scored
            return StreamingResponse(_replay(body, usage), media_type="text/event-stream", headers=SSE_HEADERS)
        return body

    @app.post("/tokenize", dependencies=auth, response_model=TokenizeResponse,
              responses={k: v for k, v in (responses or {}).items() if k != 200})
    async def tokenize(req: TokenizeRequest):
        _check_model(req.model, backend)
        ids = backend.tokenize(req.prompt)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=backend.context_length)

    @app.post("/detokenize", dependencies=auth, response_model=DetokenizeResponse,
              responses={k: v for k, v in (responses or {}).items() if k != 200})
    async def detokenize(req: DetokenizeRequest):
        _check_model(req.model, backend)
        bad = [t for t in req.tokens if not 0 <= t < backend.vocab_size]
        if bad:
            raise APIError(400, f"tokens: token id {bad[0]} is outside the vocabulary [0, {backend.vocab_size})",
                           "tokens")
        return DetokenizeResponse(prompt=backend.detokenize(req.tokens))


async def _replay(body: CompletionResponse, include_usage: bool) -> AsyncIterator[bytes]:
    """A finished response as a stream: one chunk per choice, the usage chunk, [DONE]."""
    head = {"id": body.id, "object": "text_completion", "created": body.created, "model": body.model}
    for c in body.choices:
        yield sse({**head, "choices": [c.model_dump()], **({"usage": None} if include_usage else {})})
    if include_usage:
        yield sse({**head, "choices": [], "usage": body.usage.model_dump()})
    yield sse("[DONE]")


def _check_model(model: Optional[str], backend: Any) -> None:
    if model is not None and model != backend.model_name:
        raise APIError(404, f"model '{model}' does not exist; this server serves '{backend.model_name}'", "model")


def _rank(jobs: list[Job], n: int) -> list[Job]:
    """Per prompt, the n jobs to return: all of them, or with best_of the n of highest
    cumulative logprob; indexed prompt-major in order."""
    by_prompt: dict[int, list[Job]] = {}
    for j in jobs:
        by_prompt.setdefault(j.prompt_index, []).append(j)
    out = []
    for i, group in sorted(by_prompt.items()):
        if len(group) > n:
            group = sorted(group, key=lambda j: -sum(e.logprob or 0.0 for e in j.logprobs))[:n]
        for k, j in enumerate(group):
            j.index = i * n + k
            out.append(j)
    return out


def _choice(job: Job, with_logprobs: bool) -> CompletionChoice:
    final = job.final
    text = "" if job.score_only else job.text
    entries = [] if job.score_only else job.logprobs
    if job.echo is not None:
        text = job.echo + text
        entries = list(final.prompt_logprobs or []) + entries
    return CompletionChoice(index=job.index, text=text,
                            finish_reason="length" if job.score_only else openai_reason(final),
                            logprobs=logprobs_of(entries) if with_logprobs else None)


async def _events(backend: Any, jobs: list[Job], rid: str, created: int, include_usage: bool,
                  with_logprobs: bool) -> AsyncIterator[bytes]:
    """OpenAI-style chunks for all choices, interleaved as their tokens arrive, then
    (stream_options.include_usage) a usage chunk with no choices, then `data: [DONE]`."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(job: Job) -> None:
        try:
            async with aclosing(deltas(backend, job.prompt, job.params)) as stream:
                async for d in stream:
                    await queue.put((job, d))
                    if d.finished:
                        return
        except Exception as e:
            await queue.put((job, e))

    def chunk(choices: list, usage: Optional[dict] = None) -> bytes:
        body = {"id": rid, "object": "text_completion", "created": created, "model": backend.model_name,
                "choices": choices}
        if include_usage:
            body["usage"] = usage
        return sse(body)

    offsets = {j.index: 0 for j in jobs}
    for j in jobs:  # echo: the prompt comes first
        if j.echo:
            offsets[j.index] = len(j.echo)
            yield chunk([{"index": j.index, "text": j.echo, "finish_reason": None, "logprobs": None}])
    tasks = [asyncio.create_task(pump(j)) for j in jobs]
    pending, prompt_tokens, completion_tokens = len(jobs), {}, 0
    try:
        while pending:
            job, d = await queue.get()
            if isinstance(d, Exception):
                yield sse(failure_body(d))
                return
            text = "" if job.score_only else d.text  # max_tokens 0: the prompt only
            if text or d.finished:
                lp = None
                if with_logprobs:
                    lp = logprobs_of([] if job.score_only else d.logprobs, offsets[job.index]).model_dump()
                    offsets[job.index] += len(text)
                reason = ("length" if job.score_only else openai_reason(d)) if d.finished else None
                yield chunk([{"index": job.index, "text": text, "finish_reason": reason, "logprobs": lp}])
            if d.finished:
                pending -= 1
                prompt_tokens[job.prompt_index] = d.prompt_tokens
                completion_tokens += 0 if job.score_only else d.completion_tokens
        if include_usage:
            p = sum(prompt_tokens.values())
            yield chunk([], {"prompt_tokens": p, "completion_tokens": completion_tokens,
                             "total_tokens": p + completion_tokens})
        yield sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
