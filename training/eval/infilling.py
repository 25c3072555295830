"""HumanEval-infilling (Bavarian et al. 2022; openai/human-eval-infilling, MIT).

Four benchmarks over the HumanEval problems, each a `prompt` (before the hole), a `suffix`
(after it) and the `canonical_solution` (the middle). The data ships with this package
(`data/human_eval_infilling/`, with its licence). A completion is scored by running
`prompt + completion + suffix` with the problem's tests in the sandbox (pass@k, as
humaneval.py does for left-to-right HumanEval); single-line also by exact match of the
stripped line.

Completions come from the service's own engine (serving/engine/engine.py, in this process, the
FIM prompt built by serving/engine/fim.py) or from a running server's `/v1/completions` with
`suffix`, so what is measured is what the endpoint serves.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Optional, Sequence

from training.eval.humaneval import select

DATA = Path(__file__).resolve().parent / "data" / "human_eval_infilling"
BENCHMARKS = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random-span": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-span-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}


def load_problems(benchmark: str, limit: Optional[int] = None,
                  task_ids: Optional[Sequence[str]] = None) -> list[dict]:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"--infilling {benchmark!r}: must be one of {', '.join(BENCHMARKS)}")
    with gzip.open(DATA / BENCHMARKS[benchmark], "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return select(problems, limit, task_ids, benchmark)


def stops_for(benchmark: str) -> tuple[str, ...]:
    """Single-line: the hole is one line, so generation stops at the newline. The others end
    where the model ends the middle (end-of-text / <fim_pad>) or at max_tokens."""
    return ("\n",) if benchmark == "single-line" else ()


def cut_for(benchmark: str):
    """The middle that is scored. Single-line: the first line, with its newline (the
    suffix starts on the next line)."""
    if benchmark == "single-line":
        return lambda text: text.split("\n", 1)[0] + "\n"
    return lambda text: text


def exact_match(problems: Sequence[dict], completions: dict[str, list[str]]) -> float:
    """Fraction of samples whose stripped first line equals the stripped canonical line."""
    cut = cut_for("single-line")
    hits = [cut(c).strip() == p["canonical_solution"].strip() for p in problems for c in completions[p["task_id"]]]
    return sum(hits) / len(hits) if hits else 0.0


def generate_with_engine(checkpoint: str | Path, problems: Sequence[dict], params, n: int,
                         batch_size: int = 8, left_to_right: bool = False) -> tuple[dict[str, list[str]], int]:
    """n middles per problem from the serving engine, in this process: a handful of problems
    needs no actor pool. Returns ({task_id: [middle, ...]}, problems whose prompt was cut).
    left_to_right: complete from the prefix alone (the baseline a model without FIM offers)."""
    from dataclasses import replace

    from serving.engine.engine import Engine
    from serving.engine.fim import Infill
    from training.eval.generation import sample_seed

    engine = Engine(checkpoint, num_threads=None)
    if engine.fim is None and not left_to_right:
        raise ValueError(f"--checkpoint {checkpoint}: the model was trained without fill-in-the-middle "
                         "(no fim.json with fim_rate > 0); train with --fim-rate > 0")
    rows = [p for p in problems for _ in range(n)]
    out: dict[str, list[str]] = {p["task_id"]: [] for p in problems}
    truncated = set()
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        prompts = [p["prompt"] if left_to_right else Infill(p["prompt"], p["suffix"]) for p in batch]
        seeded = [replace(params, seed=sample_seed(params, start + j)) for j in range(len(batch))]
        for p, c in zip(batch, engine.generate(prompts, seeded)):
            out[p["task_id"]].append(c.text)
            if c.truncated:
                truncated.add(p["task_id"])
    return out, len(truncated)
