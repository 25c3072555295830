"""Output processing, row by row: what a sampled token releases to the client.

Per step and request (vLLM keeps this apart from sampling as well): append the token, or
end the row at end-of-text / a FIM sentinel; detokenize; cut at the first stop string;
hold back what may still change (a half-decoded UTF-8 character, a tail that could begin
a stop string: the client must never see a stop string); and release the logprob entries
of the tokens behind the text that goes out. A row that fails ends with an "error" Delta.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Optional, Sequence

from serving.engine.params import Delta, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)

Decode = Callable[[Sequence[int]], str]  # token ids -> text


@dataclass
class Row:
    """Decode state of one request inside a running batch."""

    params: SamplingParams
    prompt_tokens: int
    truncated: bool
    key: int  # the request's seed, hashed: its random stream is sampling.uniform(key, step)
    prompt: Any = None  # the request's prompt as it was given (text, ids or an Infill), for engine plugins
    prompt_ids: Sequence[int] = ()  # the prompt's token ids (the repetition penalty counts them)
    stop_from: int = 0  # characters of the text before min_tokens was reached: no stop string ends there
    tokens: list[int] = field(default_factory=list)  # the completion's tokens (eos excluded)
    generated: int = 0  # tokens sampled, eos included: what usage reports, as vLLM does
    emitted: int = 0  # characters of the completion already handed out
    done: bool = False
    incremental: bool = True  # hand out text step by step (streaming) or only at the end
    cancel: Optional[threading.Event] = None  # set when the client went away: the row leaves
    error: Optional[str] = None  # why this row failed
    lp: list[TokenLogprob] = field(default_factory=list)  # one per completion token, if asked
    lp_sent: int = 0  # entries of lp already handed out
    prompt_lp: Optional[list[TokenLogprob]] = None  # the prompt's tokens scored (echo), if asked


def fail(row: Row, e: BaseException) -> None:
    """Mark one row failed (its batch goes on)."""
    log.error("decoding one request failed; its batch goes on", exc_info=e)
    row.done, row.error = True, f"{type(e).__name__}: {e}"


def failure(row: Row) -> Delta:
    """The final Delta of a failed row."""
    return Delta("", True, "error", row.prompt_tokens, row.generated, row.truncated, error=row.error)


def cancelled(row: Row) -> Delta:
    """End a row whose client went away; returns its final Delta."""
    row.done = True
    return Delta("", True, "cancelled", row.prompt_tokens, row.generated, row.truncated)


def append_token(row: Row, token: int, entry: Optional[TokenLogprob], ends: Container[int],
                 decode: Decode) -> Optional[Delta]:
    """Append a token to a row; return the text it may release now, and the verdict if done.
    `ends`: the ids that end a completion (end-of-text, FIM sentinels)."""
    p = row.params
    reason: Optional[str] = None
    row.generated += 1
    shown = True
    if token in p.stop_token_ids:
        # A stop token ends the completion ("stop"); its text stays out unless asked for
        # (and an end token's only with skip_special_tokens off), as in vLLM.
        reason = "stop"
        shown = p.include_stop_str_in_output and not (token in ends and p.skip_special_tokens)
    elif token in ends:
        # End-of-text / a FIM sentinel is never part of the completion; it ends it
        # unless the request ignores it (then the row decodes on to its length, and the
        # token shows only with skip_special_tokens off).
        reason = None if p.ignore_eos else "eos"
        shown = reason is None and not p.skip_special_tokens
    if shown:
        row.tokens.append(token)
        if entry is not None:
            row.lp.append(entry)
    if not (row.incremental or p.stop or reason or row.generated >= p.max_new_tokens):
        return None  # nothing to show or check yet: skip decoding
    text = decode(row.tokens)
    if p.stop and row.generated <= p.min_tokens:
        row.stop_from = len(text)  # vLLM checks stop strings only after min_tokens
    elif p.stop:
        cut, end = -1, -1
        for s in p.stop:
            i = text.find(s, max(0, row.stop_from - len(s) + 1))
            if i >= 0 and (cut < 0 or i < cut):
                cut, end = i, i + len(s)
        if cut >= 0:
            text, reason = text[:end if p.include_stop_str_in_output else cut], "stop"
    if reason is None and row.generated >= p.max_new_tokens:
        reason = "length"
    if reason is None and not row.incremental:
        return None
    if reason is not None:
        row.done = True
        new, row.emitted = text[row.emitted:], len(text)
        return Delta(new, True, reason, row.prompt_tokens, row.generated, row.truncated,
                     logprobs=release(row, len(text), decode, everything=reason != "stop"),
                     prompt_logprobs=row.prompt_lp)
    safe = releasable(text, row.emitted, p.stop)
    if safe <= row.emitted:
        return None
    new, row.emitted = text[row.emitted:safe], safe
    return Delta(new, logprobs=release(row, safe, decode))


def releasable(text: str, emitted: int, stop: Sequence[str]) -> int:
    """How much of `text` may go out now: all of it but a trailing half-decoded character
    and a tail that could be the start of a stop string (never less than `emitted`)."""
    safe = len(text)
    while safe > emitted and text[safe - 1] == "\ufffd":
        safe -= 1
    held = text[:safe]
    for s in stop:
        for k in range(min(len(s) - 1, len(held)), 0, -1):
            if held.endswith(s[:k]):
                safe = min(safe, len(held) - k)
                break
    return safe


def release(row: Row, upto: int, decode: Decode, everything: bool = False) -> list[TokenLogprob]:
    """The logprob entries of the tokens whose text starts before character `upto` of the
    completion (all of them when the row ended other than by a stop string)."""
    if not row.lp:
        return []
    end = len(row.lp)
    if not everything:
        end = row.lp_sent
        while end < len(row.lp) and len(decode(row.tokens[:end])) < upto:
            end += 1
    out, row.lp_sent = row.lp[row.lp_sent:end], max(row.lp_sent, end)
    return out
