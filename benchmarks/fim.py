"""FIM for free? The tiny preset trained twice on the same data for the same tokens, once left
to right (data.fim_rate 0) and once with fill-in-the-middle (data.fim_rate 0.5), as in
Bavarian et al. 2022, who find FIM costs no left-to-right loss at scale.

Both runs share the tokenizer (with the FIM sentinels), the chunks (the FIM run's are the
same chunks, half of them rewritten), the validation split (left to right for both, so
eval_loss is the same L2R measure), the random seed, steps and batch. Reported per run: the final
L2R validation loss, and HumanEval single-line infilling on the first --problems problems
(greedy; exact match and pass@1 in the sandbox): the FIM model gets prefix + suffix, the
left-to-right model can only complete from the prefix.

    .venv/bin/python benchmarks/fim.py [--steps 200] [--files 200] [--problems 50]

Prints one JSON line. On a shared machine the timings move with its load; the losses do not.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def config(out: Path, fim_rate: float, a: argparse.Namespace, tokenizer: str | None):
    from short_job import short_tiny_job

    cfg = short_tiny_job(str(out), a.files, a.workers, a.steps)
    cfg.data.fim_rate = fim_rate
    cfg.data.tokenizer = tokenizer
    return cfg.validate()


def infilling(model_dir: Path, problems: list, left_to_right: bool) -> dict:
    from serving.engine.params import SamplingParams
    from training.eval.humaneval import score
    from training.eval.infilling import (
        cut_for,
        exact_match,
        generate_with_engine,
        stops_for,
    )

    params = SamplingParams(temperature=0.0, max_new_tokens=32, seed=0, stop=stops_for("single-line"))
    completions, cut = generate_with_engine(model_dir, problems, params, 1, left_to_right=left_to_right)
    result = score(problems, completions, cut=cut_for("single-line"))
    return {"prompt": "prefix only" if left_to_right else "prefix + suffix (PSM)",
            "exact_match": round(exact_match(problems, completions), 4),
            "pass@1": round(result.pass_at_k["pass@1"], 4), "prompts_truncated": cut}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--files", type=int, default=200, help="standard-library files in the corpus")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--problems", type=int, default=50, help="single-line infilling problems scored")
    ap.add_argument("--output", default=None, help="folder for both runs (default: a temporary one)")
    a = ap.parse_args()

    from training.data.pipeline import prepare_data
    from training.eval.infilling import load_problems
    from training.train.job import run_job

    out = Path(a.output or tempfile.mkdtemp(prefix="bench_fim_"))
    t0 = time.time()
    l2r_cfg = config(out / "l2r", 0.0, a, None)
    l2r_data = prepare_data(l2r_cfg)  # trains the tokenizer the FIM run reuses
    fim_cfg = config(out / "fim", 0.5, a, str(l2r_data.tokenizer_dir))
    fim_data = prepare_data(fim_cfg)
    problems = load_problems("single-line", limit=a.problems)
    runs = {}
    for name, cfg, data in (("fim_rate_0", l2r_cfg, l2r_data), ("fim_rate_0.5", fim_cfg, fim_data)):
        summary = run_job(cfg, prepared=data)
        runs[name] = {"final_eval_loss_l2r": summary["final_eval_loss"],
                      "final_train_loss": summary["final_train_loss"],
                      "train_tokens": summary["train_tokens"], "train_chunks": data.stats["chunks_train"],
                      "single_line_infilling": infilling(Path(cfg.output) / "model", problems,
                                                         left_to_right=cfg.data.fim_rate == 0)}
    a_loss, b_loss = (runs[k]["final_eval_loss_l2r"] for k in ("fim_rate_0", "fim_rate_0.5"))
    print(json.dumps({
        "benchmark": "fim",
        "model": f"tiny preset, {a.steps} steps, {a.files} stdlib files",
        "runs": runs,
        "l2r_eval_loss_delta": round(b_loss - a_loss, 4) if a_loss is not None and b_loss is not None else None,
        "problems": len(problems),
        "wall_s": round(time.time() - t0, 1),
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
