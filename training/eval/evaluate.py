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

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from training.eval.config import EvalConfig, parse
from training.fim_format import read_fim_metadata
from training.layout import RunLayout


class EvalError(ValueError):
    """Bad arguments or checkpoint; the message says which."""


# ---- checking inputs (no Ray) -----------------------------------------------------------


def resolve_checkpoint(path: str) -> tuple[Path, Optional[Path]]:
    """(model folder, run folder or None). Accepts OUTPUT/model or OUTPUT itself; the
    folder is then checked by the serving engine's own check, since the engine loads it."""
    from serving.engine.engine import CheckpointError, check_checkpoint

    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise EvalError(f"--checkpoint {path}: no such folder")
    if not p.is_dir():
        raise EvalError(f"--checkpoint {path}: not a folder (expected a Hugging Face model folder)")
    if not (p / "config.json").is_file() and (RunLayout(p).model / "config.json").is_file():
        p = RunLayout(p).model  # a run's OUTPUT folder
    try:
        check_checkpoint(p)
    except CheckpointError as e:
        raise EvalError(f"--checkpoint {path}: {e}") from None
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvalError(f"--checkpoint {path}: config.json is unreadable: {e}") from None
    if "model_type" not in cfg or "n_positions" not in cfg:
        raise EvalError(f"--checkpoint {path}: config.json is not a GPT-2-style causal LM config "
                        "(no model_type / n_positions)")
    return p, p.parent if RunLayout(p.parent).is_run() else None


def model_config(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))


def data_config_for(checkpoint: Path, run: Optional[Path], cfg: EvalConfig) -> tuple[Any, Optional[str], str]:
    """(DataConfig, corpus, split): the training run's data settings where known, the
    checkpoint's context length, and what to score."""
    from training.config import DataConfig

    p = cfg.perplexity
    known = {f.name for f in dataclasses.fields(DataConfig)}
    saved: dict[str, Any] = {}
    state = RunLayout(run).run_state if run else None
    if state and state.is_file():
        try:
            saved = json.loads(state.read_text(encoding="utf-8")).get("config", {}).get("data", {}) or {}
        except (OSError, ValueError):
            saved = {}
    d = DataConfig(**{k: v for k, v in saved.items() if k in known})
    d.context_length = int(model_config(checkpoint)["n_positions"])
    d.tokenizer = str(checkpoint)
    if p.max_files is not None:
        d.max_files = p.max_files
    if p.corpus:
        return d, p.corpus, p.split or "all"
    if d.valid_corpus and not p.split:
        return d, d.valid_corpus, "all"
    return d, d.corpus, p.split or "valid"


# ---- the stages ---------------------------------------------------------------------------


def run_perplexity(checkpoint: Path, run: Optional[Path], cfg: EvalConfig) -> dict[str, Any]:
    from training.data.pipeline import chunk_dataset
    from training.eval.perplexity import evaluate_loss

    d, corpus, split = data_config_for(checkpoint, run, cfg)
    ds = chunk_dataset(corpus, checkpoint, d, split=split)
    try:
        out = evaluate_loss(ds, checkpoint, workers=cfg.run.workers, batch_size=cfg.run.batch_size,
                            max_chunks=cfg.perplexity.max_chunks)
    except ValueError as e:
        raise EvalError(f"{e} [corpus={corpus or 'stdlib default'}, split={split}, "
                        f"max_files={d.max_files}]") from None
    return {**out, "corpus": corpus, "split": split, "context_length": d.context_length,
            "chunking": d.chunking}


def _generation_budget(cfg: EvalConfig, checkpoint: Optional[Path], default: int) -> tuple[Optional[str], int]:
    """(API key for --endpoint, tokens per completion): --max-new-tokens or `default`, at most
    half the model's context (from the checkpoint, or from the server's /v1/models card)."""
    import os

    from training.eval.generation import served_model

    t = cfg.target
    api_key = t.api_key or os.environ.get("COMPLETE_API_KEY") or None
    if checkpoint is not None:
        ctx = int(model_config(checkpoint)["n_positions"])
    else:
        card = served_model(t.endpoint, api_key)
        t.model_name = t.model_name or str(card["id"])
        ctx = int(card.get("max_model_len") or 2048)
    max_new = cfg.humaneval.max_new_tokens or min(default, ctx // 2)
    if max_new >= ctx:
        raise EvalError(f"--max-new-tokens {max_new} must be below the model's context ({ctx})")
    return api_key, max_new


def _sampling(cfg: EvalConfig, max_new: int, stop: Any) -> Any:
    from training.eval.generation import SamplingParams

    h = cfg.humaneval
    return SamplingParams(temperature=h.temperature, top_p=h.top_p, max_new_tokens=max_new, seed=h.seed, stop=stop)


def run_humaneval(cfg: EvalConfig, checkpoint: Optional[Path]) -> dict[str, Any]:
    from training.eval.generation import generate_with_endpoint, generate_with_ray, prompts_of
    from training.eval.humaneval import STOP_SEQUENCES, load_problems, score
    from training.eval.sandbox import network_namespace_available

    h = cfg.humaneval
    problems = load_problems(limit=h.problems, task_ids=h.task_id_list())
    api_key, max_new = _generation_budget(cfg, checkpoint, default=256)
    params = _sampling(cfg, max_new, STOP_SEQUENCES)
    t0 = time.time()
    truncated = 0
    if checkpoint is not None:
        completions, truncated = generate_with_ray(checkpoint, prompts_of(problems), params, n=h.n,
                                                   workers=cfg.run.workers, batch_size=cfg.run.batch_size)
    else:
        completions = generate_with_endpoint(cfg.target.endpoint, prompts_of(problems), params, n=h.n,
                                             model=cfg.target.model_name, api_key=api_key)
    gen_s = time.time() - t0
    t0 = time.time()
    limits = h.limits()
    result = score(problems, completions, limits, workers=h.exec_workers)
    out = result.to_dict(with_samples=h.save_samples)
    out.update({"sampling": {"n": h.n, **dataclasses.asdict(params)}, "prompts_truncated": truncated,
                "generation_s": round(gen_s, 2), "execution_s": round(time.time() - t0, 2),
                "sandbox": {"timeout_s": h.timeout, "memory_mb": h.memory_mb, "isolation": limits.isolation,
                            # the jail always has its own; the guard alone only where unshare works
                            "network_namespace": limits.isolation == "bwrap" or network_namespace_available()}})
    return out


def run_infilling(cfg: EvalConfig, checkpoint: Optional[Path]) -> dict[str, Any]:
    from training.eval.generation import generate_with_endpoint
    from training.eval.humaneval import score
    from training.eval.infilling import cut_for, exact_match, generate_with_engine, load_problems, stops_for

    h = cfg.humaneval
    problems = load_problems(h.infilling, limit=h.problems, task_ids=h.task_id_list())
    api_key, max_new = _generation_budget(cfg, checkpoint, default=64 if h.infilling == "single-line" else 128)
    stops = stops_for(h.infilling)
    params = _sampling(cfg, max_new, stops)
    t0 = time.time()
    truncated = 0
    if checkpoint is not None:
        completions, truncated = generate_with_engine(checkpoint, problems, params, h.n,
                                                      batch_size=cfg.run.batch_size)
    else:
        completions = generate_with_endpoint(cfg.target.endpoint, {p["task_id"]: p["prompt"] for p in problems},
                                             params, n=h.n, model=cfg.target.model_name, api_key=api_key,
                                             suffixes={p["task_id"]: p["suffix"] for p in problems})
    gen_s = time.time() - t0
    t0 = time.time()
    result = score(problems, completions, h.limits(), workers=h.exec_workers, cut=cut_for(h.infilling))
    out = {"benchmark": h.infilling, **result.to_dict(with_samples=h.save_samples)}
    if h.infilling == "single-line":
        out["exact_match"] = exact_match(problems, completions)
    out.update({"sampling": {"n": h.n, "temperature": h.temperature, "top_p": h.top_p,
                             "max_new_tokens": max_new, "seed": h.seed, "stop": list(stops)},
                "prompts_truncated": truncated, "generation_s": round(gen_s, 2),
                "execution_s": round(time.time() - t0, 2)})
    return out


def check_inputs(cfg: EvalConfig) -> tuple[Optional[Path], Optional[Path]]:
    """(checkpoint, run folder): everything checkable without Ray; EvalError/ConfigError otherwise."""
    t, p, h = cfg.target, cfg.perplexity, cfg.humaneval
    checkpoint = run = None
    if t.checkpoint:
        checkpoint, run = resolve_checkpoint(t.checkpoint)
    if t.run:
        run = Path(t.run).expanduser().resolve()
        if not run.is_dir():
            raise EvalError(f"--run {t.run}: no such folder")
    if p.corpus and checkpoint is not None and p.perplexity:
        from training.data.sources import resolve_corpus

        resolve_corpus(p.corpus, "--corpus", p.max_files)  # a typo fails here, not in Ray
    if h.humaneval:
        from training.eval.humaneval import load_problems

        load_problems(limit=1)  # the optional dependency is there, before any Ray work
    if h.humaneval or h.infilling:  # generated code will run: refuse now if its jail cannot
        from training.eval.sandbox import check_isolation

        check_isolation(h.limits().isolation)
    if h.infilling and checkpoint is not None and not _can_infill(checkpoint):
        raise EvalError(f"--checkpoint {t.checkpoint}: trained without fill-in-the-middle (no fim.json "
                        "with fim_rate > 0), so --infilling cannot run; train with --fim-rate > 0")
    return checkpoint, run


def main(argv: Optional[list[str]] = None) -> int:
    try:
        cfg = parse(argv, description=__doc__)
        checkpoint, run = check_inputs(cfg)
    except (EvalError, RuntimeError, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2

    results: dict[str, Any] = {"checkpoint": str(checkpoint) if checkpoint else None,
                               "endpoint": cfg.target.endpoint, "run": str(run) if run else None}
    if checkpoint is not None:
        results["parameters"] = _parameter_count(checkpoint)
    t0 = time.time()
    perplexity = checkpoint is not None and cfg.perplexity.perplexity
    try:
        if perplexity or (checkpoint is not None and cfg.humaneval.humaneval):
            from training.ray_utils import init_ray

            init_ray()
        if perplexity:
            results["perplexity"] = run_perplexity(checkpoint, run, cfg)
        if cfg.humaneval.humaneval:
            results["humaneval"] = run_humaneval(cfg, checkpoint)
        if cfg.humaneval.infilling:
            results["infilling"] = run_infilling(cfg, checkpoint)
    except (EvalError, ValueError) as e:  # ConfigError is a ValueError: a bad corpus, split...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # e.g. EndpointError: say it plainly, no traceback wall
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    results["elapsed_s"] = round(time.time() - t0, 2)
    write_results(cfg, results, checkpoint, run)
    print(json.dumps(results, indent=2))
    return 0


def write_results(cfg: EvalConfig, results: dict[str, Any], checkpoint: Optional[Path], run: Optional[Path]) -> None:
    """--json (default REPORT/eval.json or ./eval.json), and with --report the report and model card."""
    report = cfg.run.report
    json_path = Path(cfg.run.json) if cfg.run.json else (Path(report) / "eval.json" if report else Path("eval.json"))
    if report:
        from training.eval.report import write_report

        results["report"] = write_report(report, results, run_dir=run)
        if checkpoint is not None and run is not None and checkpoint == RunLayout(run).model:
            from training.export.model_card import write_model_card

            results["report"]["model_card"] = str(write_model_card(run, checkpoint, evaluation=results))
    if not report or json_path != Path(report) / "eval.json":
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def _can_infill(checkpoint: Path) -> bool:
    try:
        meta = read_fim_metadata(checkpoint)
        return meta is not None and float(meta.get("fim_rate", 0)) > 0
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
