"""Evaluate a checkpoint: `python training/eval/evaluate.py --checkpoint runs/tiny/model [flags]`.

- Validation loss and perplexity on held-out code (default on): a Ray Data job over the same
  reading, filtering and chunking as training. `--corpus` names a held-out corpus (scored
  whole); without it, the training run's validation split (or the stdlib default's).
- `--humaneval`: HumanEval pass@1/10/100, samples generated on Ray actors (or by a running
  server with `--endpoint URL`), each executed in a sandboxed child process. Generated code is
  never executed without this flag.
- `--infilling single-line|multi-line|random-span|random-span-light`: HumanEval-infilling
  pass@k (sandboxed, like --humaneval; the sampling flags apply) and, for single-line, exact
  match; middles from the service's engine in this process (or `--endpoint URL` with `suffix`).
- `--report DIR`: eval.json + report.md beside published anchors (+ the run's loss curve).

Prints the results as JSON and writes them to `--json` (default: REPORT/eval.json or ./eval.json).
Bad arguments and missing or broken checkpoints fail in a second, before any Ray work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

# `python training/eval/evaluate.py` puts training/ on sys.path, not the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class EvalError(ValueError):
    """Bad arguments or checkpoint; the message says which."""


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("what to evaluate")
    src.add_argument("--checkpoint", help="a Hugging Face model folder (a run's OUTPUT/model/) or a run's OUTPUT")
    src.add_argument("--endpoint", help="URL of a running OpenAI-compatible server (…/v1/completions); "
                                        "HumanEval only")
    src.add_argument("--model-name", help="model name sent to --endpoint (default: the first of GET /v1/models)")
    src.add_argument("--api-key", help="bearer token for --endpoint (default: $COMPLETE_API_KEY)")
    src.add_argument("--run", help="the training run's OUTPUT folder (loss curve, data settings); "
                                   "found automatically when --checkpoint is OUTPUT or OUTPUT/model")
    ppl = ap.add_argument_group("validation loss / perplexity")
    ppl.add_argument("--corpus", help="held-out corpus (same forms as training's --corpus); scored whole")
    ppl.add_argument("--split", choices=("train", "valid", "all"),
                     help="which hash split of the corpus to score (default: all with --corpus, else valid)")
    ppl.add_argument("--max-files", type=int, help="read at most this many corpus files")
    ppl.add_argument("--max-chunks", type=int, help="score at most this many chunks")
    ppl.add_argument("--no-perplexity", action="store_true", help="skip the loss/perplexity job")
    he = ap.add_argument_group("HumanEval")
    he.add_argument("--humaneval", action="store_true", help="run HumanEval (executes generated code, sandboxed)")
    he.add_argument("--infilling", choices=("single-line", "multi-line", "random-span", "random-span-light"),
                    help="run a HumanEval-infilling benchmark (fill-in-the-middle; executes code, sandboxed)")
    he.add_argument("--n", type=int, default=1, help="samples per problem (200 for the paper's pass@100)")
    he.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    he.add_argument("--top-p", type=float, default=0.95)
    he.add_argument("--max-new-tokens", type=int,
                    help="tokens per completion (default: 256, at most half the model's context)")
    he.add_argument("--problems", "--limit", dest="problems", type=int,
                    help="only the first N problems (quick runs)")
    he.add_argument("--task-ids", help="comma-separated task ids, e.g. HumanEval/0,HumanEval/7")
    he.add_argument("--seed", type=int, default=0)
    he.add_argument("--timeout", type=float, default=5.0, help="wall-clock seconds per sample")
    he.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per sample")
    he.add_argument("--exec-workers", type=int, help="samples executed in parallel (default: cores)")
    he.add_argument("--save-samples", action="store_true", help="keep every completion and outcome in the JSON")
    run = ap.add_argument_group("execution and output")
    run.add_argument("--workers", type=int, default=1, help="Ray actors that load the serving engine (each 1 CPU)")
    run.add_argument("--batch-size", type=int, default=16, help="chunks / prompts per model call")
    run.add_argument("--report", help="write eval.json, report.md (and loss.png) to this folder")
    run.add_argument("--json", help="where to write the results JSON (default: REPORT/eval.json or ./eval.json)")
    args = ap.parse_args(argv)

    if not args.checkpoint and not args.endpoint:
        ap.error("give --checkpoint DIR or --endpoint URL")
    if args.checkpoint and args.endpoint:
        ap.error("give --checkpoint or --endpoint, not both")
    if args.endpoint and not (args.humaneval or args.infilling):
        ap.error("--endpoint evaluates HumanEval only: add --humaneval or --infilling")
    if args.endpoint and not args.endpoint.startswith(("http://", "https://")):
        ap.error(f"--endpoint {args.endpoint!r}: must be an http(s) URL")
    for name in ("n", "workers", "batch_size", "memory_mb", "max_files", "max_chunks", "problems",
                 "max_new_tokens", "exec_workers"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1 (got {v})")
    if not 0.0 <= args.temperature <= 2.0:
        ap.error(f"--temperature must be in [0, 2] (got {args.temperature})")
    if not 0.0 < args.top_p <= 1.0:
        ap.error(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.timeout <= 0:
        ap.error(f"--timeout must be > 0 (got {args.timeout})")
    return args


# ---- checking inputs (no Ray) -----------------------------------------------------------


def resolve_checkpoint(path: str) -> tuple[Path, Optional[Path]]:
    """(model folder, run folder or None). Accepts OUTPUT/model or OUTPUT itself."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise EvalError(f"--checkpoint {path}: no such folder")
    if not p.is_dir():
        raise EvalError(f"--checkpoint {path}: not a folder (expected a Hugging Face model folder)")
    if not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        p = p / "model"  # a run's OUTPUT folder
    missing = [what for what, names in (("config.json", ("config.json",)), ("weights", WEIGHT_FILES),
                                        ("tokenizer", TOKENIZER_FILES))
               if not any((p / n).is_file() for n in names)]
    if missing:
        raise EvalError(f"--checkpoint {path}: not a model folder (missing {', '.join(missing)}); "
                        "expected a training run's OUTPUT/model/")
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvalError(f"--checkpoint {path}: config.json is unreadable: {e}") from None
    if "model_type" not in cfg or "n_positions" not in cfg:
        raise EvalError(f"--checkpoint {path}: config.json is not a GPT-2-style causal LM config "
                        "(no model_type / n_positions)")
    run = p.parent if (p.parent / "metrics.jsonl").is_file() or (p.parent / "run_state.json").is_file() else None
    return p, run


def model_config(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))


def data_config_for(checkpoint: Path, run: Optional[Path], args: argparse.Namespace) -> tuple[Any, Optional[str], str]:
    """(DataConfig, corpus, split): the training run's data settings where known, the
    checkpoint's context length, and what to score."""
    from training.config import DataConfig

    known = {f.name for f in dataclasses.fields(DataConfig)}
    saved: dict[str, Any] = {}
    state = run / "run_state.json" if run else None
    if state and state.is_file():
        try:
            saved = json.loads(state.read_text(encoding="utf-8")).get("config", {}).get("data", {}) or {}
        except (OSError, ValueError):
            saved = {}
    d = DataConfig(**{k: v for k, v in saved.items() if k in known})
    d.context_length = int(model_config(checkpoint)["n_positions"])
    d.tokenizer = str(checkpoint)
    if args.max_files is not None:
        d.max_files = args.max_files
    if args.corpus:
        return d, args.corpus, args.split or "all"
    if d.valid_corpus and not args.split:
        return d, d.valid_corpus, "all"
    return d, d.corpus, args.split or "valid"


# ---- the stages ---------------------------------------------------------------------------


def run_perplexity(checkpoint: Path, run: Optional[Path], args: argparse.Namespace) -> dict[str, Any]:
    from training.data.pipeline import chunk_dataset
    from training.eval.perplexity import evaluate_loss

    d, corpus, split = data_config_for(checkpoint, run, args)
    ds = chunk_dataset(corpus, checkpoint, d, split=split)
    try:
        out = evaluate_loss(ds, checkpoint, workers=args.workers, batch_size=args.batch_size,
                            max_chunks=args.max_chunks)
    except ValueError as e:
        raise EvalError(f"{e} [corpus={corpus or 'stdlib default'}, split={split}, "
                        f"max_files={d.max_files}]") from None
    return {**out, "corpus": corpus, "split": split, "context_length": d.context_length,
            "chunking": d.chunking}


def _task_ids(args: argparse.Namespace) -> Optional[list[str]]:
    return [t.strip() for t in args.task_ids.split(",") if t.strip()] if args.task_ids else None


def _generation_budget(args: argparse.Namespace, checkpoint: Optional[Path], default: int) -> tuple[Optional[str], int]:
    """(API key for --endpoint, tokens per completion): --max-new-tokens or `default`, at most
    half the model's context (from the checkpoint, or from the server's /v1/models card)."""
    import os

    from training.eval.generation import served_model

    api_key = args.api_key or os.environ.get("COMPLETE_API_KEY") or None
    if checkpoint is not None:
        ctx = int(model_config(checkpoint)["n_positions"])
    else:
        card = served_model(args.endpoint, api_key)
        args.model_name = args.model_name or str(card["id"])
        ctx = int(card.get("max_model_len") or 2048)
    max_new = args.max_new_tokens or min(default, ctx // 2)
    if max_new >= ctx:
        raise EvalError(f"--max-new-tokens {max_new} must be below the model's context ({ctx})")
    return api_key, max_new


def run_humaneval(args: argparse.Namespace, checkpoint: Optional[Path]) -> dict[str, Any]:
    from training.eval.generation import SamplingParams, generate_with_endpoint, generate_with_ray, prompts_of
    from training.eval.humaneval import STOP_SEQUENCES, load_problems, score
    from training.eval.sandbox import Limits, network_namespace_available

    problems = load_problems(limit=args.problems, task_ids=_task_ids(args))
    api_key, max_new = _generation_budget(args, checkpoint, default=256)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new,
                            seed=args.seed, stop=STOP_SEQUENCES)
    t0 = time.time()
    truncated = 0
    if checkpoint is not None:
        completions, truncated = generate_with_ray(checkpoint, prompts_of(problems), params, n=args.n,
                                                   workers=args.workers, batch_size=args.batch_size)
    else:
        completions = generate_with_endpoint(args.endpoint, prompts_of(problems), params, n=args.n,
                                             model=args.model_name, api_key=api_key)
    gen_s = time.time() - t0
    t0 = time.time()
    result = score(problems, completions, Limits(timeout_s=args.timeout, memory_mb=args.memory_mb),
                   workers=args.exec_workers)
    out = result.to_dict(with_samples=args.save_samples)
    out.update({"sampling": {"n": args.n, **dataclasses.asdict(params)}, "prompts_truncated": truncated,
                "generation_s": round(gen_s, 2), "execution_s": round(time.time() - t0, 2),
                "sandbox": {"timeout_s": args.timeout, "memory_mb": args.memory_mb,
                            "network_namespace": network_namespace_available()}})
    return out


def run_infilling(args: argparse.Namespace, checkpoint: Optional[Path]) -> dict[str, Any]:
    from training.eval.generation import SamplingParams, generate_with_endpoint
    from training.eval.humaneval import score
    from training.eval.infilling import cut_for, exact_match, generate_with_engine, load_problems, stops_for
    from training.eval.sandbox import Limits

    problems = load_problems(args.infilling, limit=args.problems, task_ids=_task_ids(args))
    api_key, max_new = _generation_budget(args, checkpoint, default=64 if args.infilling == "single-line" else 128)
    stops = stops_for(args.infilling)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new,
                            seed=args.seed, stop=stops)
    t0 = time.time()
    truncated = 0
    if checkpoint is not None:
        completions, truncated = generate_with_engine(checkpoint, problems, params, args.n,
                                                      batch_size=args.batch_size)
    else:
        completions = generate_with_endpoint(args.endpoint, {p["task_id"]: p["prompt"] for p in problems}, params,
                                             n=args.n, model=args.model_name, api_key=api_key,
                                             suffixes={p["task_id"]: p["suffix"] for p in problems})
    gen_s = time.time() - t0
    t0 = time.time()
    result = score(problems, completions, Limits(timeout_s=args.timeout, memory_mb=args.memory_mb),
                   workers=args.exec_workers, cut=cut_for(args.infilling))
    out = {"benchmark": args.infilling, **result.to_dict(with_samples=args.save_samples)}
    if args.infilling == "single-line":
        out["exact_match"] = exact_match(problems, completions)
    out.update({"sampling": {"n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                             "max_new_tokens": max_new, "seed": args.seed, "stop": list(stops)},
                "prompts_truncated": truncated, "generation_s": round(gen_s, 2),
                "execution_s": round(time.time() - t0, 2)})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    checkpoint = run = None
    try:
        if args.checkpoint:
            checkpoint, run = resolve_checkpoint(args.checkpoint)
        if args.run:
            run = Path(args.run).expanduser().resolve()
            if not run.is_dir():
                raise EvalError(f"--run {args.run}: no such folder")
        if args.corpus and checkpoint is not None and not args.no_perplexity:
            from training.data.sources import resolve_corpus

            resolve_corpus(args.corpus, "--corpus", args.max_files)  # a typo fails here, not in Ray
        if args.humaneval:
            from training.eval.humaneval import load_problems

            load_problems(limit=1)  # the optional dependency is there, before any Ray work
        if args.infilling and checkpoint is not None and not _can_infill(checkpoint):
            raise EvalError(f"--checkpoint {args.checkpoint}: trained without fill-in-the-middle (no fim.json "
                            "with fim_rate > 0), so --infilling cannot run; train with --fim-rate > 0")
    except (EvalError, RuntimeError, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2

    results: dict[str, Any] = {"checkpoint": str(checkpoint) if checkpoint else None,
                               "endpoint": args.endpoint, "run": str(run) if run else None}
    if checkpoint is not None:
        results["parameters"] = _parameter_count(checkpoint)
    t0 = time.time()
    try:
        needs_ray = (checkpoint is not None and not args.no_perplexity) or (checkpoint is not None and args.humaneval)
        if needs_ray:
            from training.ray_utils import init_ray

            init_ray()
        if checkpoint is not None and not args.no_perplexity:
            results["perplexity"] = run_perplexity(checkpoint, run, args)
        if args.humaneval:
            results["humaneval"] = run_humaneval(args, checkpoint)
        if args.infilling:
            results["infilling"] = run_infilling(args, checkpoint)
    except (EvalError, ValueError) as e:  # ConfigError is a ValueError: a bad corpus, split...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # e.g. EndpointError: say it plainly, no traceback wall
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    results["elapsed_s"] = round(time.time() - t0, 2)

    json_path = Path(args.json) if args.json else (Path(args.report) / "eval.json" if args.report else Path("eval.json"))
    if args.report:
        from training.eval.report import write_report

        results["report"] = write_report(args.report, results, run_dir=run)
        if checkpoint is not None and run is not None and checkpoint == run / "model":
            from training.export.model_card import write_model_card

            results["report"]["model_card"] = str(write_model_card(run, checkpoint, evaluation=results))
    if not args.report or json_path != Path(args.report) / "eval.json":
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    return 0


def _can_infill(checkpoint: Path) -> bool:
    f = checkpoint / "fim.json"
    try:
        return f.is_file() and float(json.loads(f.read_text(encoding="utf-8")).get("fim_rate", 0)) > 0
    except (OSError, ValueError):
        return False


def _parameter_count(checkpoint: Path) -> Optional[int]:
    """From the safetensors header alone (no model load); None for other formats."""
    f = checkpoint / "model.safetensors"
    if not f.is_file():
        return None
    with f.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    total = 0
    for name, meta in header.items():
        if name != "__metadata__":
            count = 1
            for s in meta["shape"]:
                count *= s
            total += count
    return total


if __name__ == "__main__":
    sys.exit(main())
