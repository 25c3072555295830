"""Sampling completions for benchmark prompts: from a checkpoint on Ray actors, or over HTTP.

Both ways generate with the serving engine (serving/engine/engine.py) and take the service's own
request type, `serving.engine.params.SamplingParams` (`n` samples per prompt is separate: it is
not a property of one completion). Checkpoint: one row per (problem, sample) in a Ray
Dataset, `map_batches` over an actor pool; each actor loads an Engine once and decodes
batches with per-row seeds, exactly as a replica would. Endpoint: plain HTTP POSTs to an
OpenAI-compatible `/v1/completions` (the project's Ray Serve app or any other); the server
does the batching and scaling.

Either way the raw text comes back and stop sequences are applied afterwards by the scorer
(they are also passed to the generator, only to stop early and save compute).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from serving.engine.params import SamplingParams

__all__ = ["SamplingParams", "CheckpointGenerator", "generate_with_ray", "generate_with_endpoint",
           "EndpointError", "served_model", "complete_http", "prompts_of"]


def sample_seed(params: SamplingParams, row: int) -> int:
    """The seed of sample `row`: fixed by the run's seed, different for every sample."""
    return (params.seed or 0) * 1_000_003 + row


class CheckpointGenerator:
    """A Ray Data actor: loads the serving Engine once, then completes batches of prompts.

    Prompts longer than the context keep their END (signature and docstring, next to where
    the body starts), as the service does, and say so in `prompt_truncated`."""

    def __init__(self, checkpoint: str, params: SamplingParams, num_threads: int = 1):
        from serving.engine.engine import Engine

        self.params = params
        self.engine = Engine(checkpoint, num_threads=num_threads)
        if params.max_new_tokens >= self.engine.context_length:
            raise ValueError(f"max_new_tokens={params.max_new_tokens} leaves no room for the prompt "
                             f"in the model's {self.engine.context_length}-token context")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [int(r) for r in batch["row"]]
        params = [replace(self.params, seed=sample_seed(self.params, r)) for r in rows]
        out = self.engine.generate([str(t) for t in batch["prompt"]], params)
        return {"row": batch["row"], "task_id": batch["task_id"],
                "completion": np.array([c.text for c in out], dtype=object),
                "prompt_truncated": np.array([c.truncated for c in out])}


def generate_with_ray(checkpoint: str | Path, prompts: dict[str, str], params: SamplingParams, n: int = 1,
                      workers: int = 1, batch_size: int = 8) -> tuple[dict[str, list[str]], int]:
    """n completions per prompt from a checkpoint, on `workers` Ray actors (1 CPU each).

    Returns ({task_id: [completion, ...]}, number of prompts that were cut to fit the context).
    Needs Ray initialized (training.ray_utils.init_ray).
    """
    import ray

    rows = [{"row": i, "task_id": t, "prompt": prompt}
            for i, (t, prompt) in enumerate((t, pr) for t, pr in prompts.items() for _ in range(n))]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), workers * 4)))
    out = ds.map_batches(CheckpointGenerator, batch_size=batch_size,
                         fn_constructor_kwargs={"checkpoint": str(checkpoint), "params": params},
                         compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1).take_all()
    out.sort(key=lambda r: r["row"])
    completions: dict[str, list[str]] = {t: [] for t in prompts}
    truncated = set()
    for r in out:
        completions[r["task_id"]].append(str(r["completion"]))
        if r["prompt_truncated"]:
            truncated.add(r["task_id"])
    return completions, len(truncated)


class EndpointError(RuntimeError):
    """The completions endpoint refused or failed a request (not a sample failure)."""


# OpenAI's API (and the project's server) accept at most 4 stop strings and a few samples
# per request; the scorer applies all stop sequences afterwards anyway.
MAX_STOP_PER_REQUEST = 4
N_PER_REQUEST = 8


def _base_url(endpoint: str) -> str:
    url = endpoint.rstrip("/")
    for suffix in ("/v1/completions", "/v1"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


def _http_json(url: str, body: Optional[dict], api_key: Optional[str], timeout_s: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read()[:500].decode("utf-8", "replace")
        raise EndpointError(f"{url} answered {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EndpointError(f"cannot reach {url}: {e}") from None


def served_model(endpoint: str, api_key: Optional[str] = None, timeout_s: float = 30.0) -> dict:
    """The first model card GET /v1/models lists: its `id` (the server checks the name) and,
    where the server says, `max_model_len`."""
    data = _http_json(_base_url(endpoint) + "/v1/models", None, api_key, timeout_s).get("data") or []
    if not data:
        raise EndpointError(f"{endpoint}: /v1/models lists no model")
    return dict(data[0])


def complete_http(endpoint: str, prompt: str, n: int, params: SamplingParams, seed: int,
                  model: str, api_key: Optional[str] = None, timeout_s: float = 300.0,
                  suffix: Optional[str] = None) -> list[str]:
    """One POST /v1/completions (with `suffix`: fill in the middle); returns the n choice
    texts in index order."""
    url = _base_url(endpoint) + "/v1/completions"
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": int(params.max_new_tokens),
                            "temperature": float(params.temperature), "top_p": float(params.top_p),
                            "n": int(n), "stop": list(params.stop[:MAX_STOP_PER_REQUEST]), "seed": int(seed)}
    if suffix is not None:
        body["suffix"] = suffix
    payload = _http_json(url, body, api_key, timeout_s)
    choices = sorted(payload.get("choices", []), key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise EndpointError(f"{url} returned {len(choices)} choices for n={n}")
    return [c.get("text", "") for c in choices]


def generate_with_endpoint(endpoint: str, prompts: dict[str, str], params: SamplingParams, n: int = 1,
                           model: Optional[str] = None, api_key: Optional[str] = None,
                           concurrency: int = 4, n_per_request: int = N_PER_REQUEST,
                           suffixes: Optional[dict[str, str]] = None) -> dict[str, list[str]]:
    """n completions per prompt from a running server, `concurrency` requests in flight.

    `model` None: ask the server (GET /v1/models). Seeds differ per request and are fixed by
    `params.seed`, so a rerun against the same server asks for the same samples.
    """
    model = model or str(served_model(endpoint, api_key)["id"])
    jobs: list[tuple[str, int, int]] = []  # (task_id, n for this request, seed)
    for i, t in enumerate(prompts):
        for j in range(math.ceil(n / n_per_request)):
            jobs.append((t, min(n_per_request, n - j * n_per_request), (params.seed or 0) + 1000 * i + j))

    def run(job: tuple[str, int, int]) -> list[str]:
        t, n, seed = job
        return complete_http(endpoint, prompts[t], n, params, seed, model, api_key,
                             suffix=suffixes.get(t) if suffixes else None)

    completions: dict[str, list[str]] = {t: [] for t in prompts}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for (t, _, _), texts in zip(jobs, pool.map(run, jobs)):
            completions[t].extend(texts)
    return completions


def prompts_of(problems: Sequence[dict]) -> dict[str, str]:
    return {p["task_id"]: p["prompt"] for p in problems}
