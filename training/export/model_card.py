"""The model card: OUTPUT/model/README.md, in the Hugging Face format.

A hub reads the YAML block at the top (library, tags, datasets, metrics, and `model-index`
for the evaluation results) and shows the Markdown below it. Everything in the card comes
from files the run already wrote: `run_state.json` (the resolved config), `run.json` (what
ran and how it ended), `data/stats.json` (what the data stage kept) and, when
`training/eval/evaluate.py --report` ran on the model, its results. So the folder can be pushed
to a hub as it is, and the card can be rewritten at any time from the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from training.layout import MODEL_CARD_FILE as CARD, RunLayout


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _dataset_id(corpus: Optional[str]) -> Optional[str]:
    """A hub data set name (owner/name, not a local path) or None."""
    if not corpus or Path(corpus).expanduser().exists() or corpus.startswith((".", "/", "~")):
        return None
    return corpus if corpus.count("/") == 1 else None


def metadata(config: dict[str, Any], run: dict[str, Any], evaluation: Optional[dict[str, Any]],
             name: str) -> dict[str, Any]:
    """The YAML block: what a hub indexes and shows in the side bar."""
    data = config.get("data", {})
    datasets = [d for d in (_dataset_id(data.get("corpus")), _dataset_id(data.get("valid_corpus"))) if d]
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "language": ["code"],
        "tags": ["gpt2", "code", "python", "code-completion", "text-generation", "ray", "deepspeed", "codecomplete"],
    }
    if datasets:
        meta["datasets"] = datasets
    if float(data.get("fim_rate") or 0) > 0:
        meta["tags"].append("fill-in-the-middle")
    metrics = ["perplexity"]
    results: list[dict[str, Any]] = []
    if run.get("final_eval_loss") is not None:
        results.append({"task": {"type": "text-generation", "name": "Causal language modeling"},
                        "dataset": {"type": datasets[-1] if datasets else "local", "name": "validation split",
                                    "split": "validation"},
                        "metrics": [{"type": "loss", "value": round(float(run["final_eval_loss"]), 4),
                                     "name": "eval loss (training run)"},
                                    {"type": "perplexity", "value": round(float(run["final_eval_perplexity"]), 2),
                                     "name": "eval perplexity (training run)"}]})
    he = (evaluation or {}).get("humaneval")
    if he:
        metrics.append("code_eval")
        results.append({"task": {"type": "text-generation", "name": "Code generation"},
                        "dataset": {"type": "openai_humaneval", "name": "HumanEval"},
                        "metrics": [{"type": "pass@" + k.split("@")[1], "value": round(float(v), 4), "name": k}
                                    for k, v in sorted(he.get("pass_at_k", {}).items()) if v is not None]})
    meta["metrics"] = metrics
    if results:
        meta["model-index"] = [{"name": name, "results": results}]
    return meta


def body(config: dict[str, Any], run: dict[str, Any], stats: dict[str, Any],
         evaluation: Optional[dict[str, Any]], name: str) -> str:
    d, m, t = config.get("data", {}), config.get("model", {}), config.get("train", {})
    filters = [f for f, on in (("exact-duplicate removal", d.get("dedup")),
                               (f"near-duplicate removal (MinHash, Jaccard >= {d.get('near_dedup')})", d.get("near_dedup")),
                               (f"the `{d.get('clean')}` cleaning recipe (seed {d.get('clean_seed', 0)})", d.get("clean")),
                               ("CodeParrot quality filters", d.get("quality_filter") and not d.get("clean"))) if on]
    if d.get("licenses"):
        filters.append("licences " + ", ".join(f"`{x}`" for x in d["licenses"]))
    if d.get("keywords"):
        filters.append("keyword filter (" + ", ".join(d["keywords"]) + ")")
    skipped = ", ".join(f"{k}: {v}" for k, v in (stats.get("files_skipped") or {}).items()) or "none"
    corpus = d.get("corpus") or "the Python standard library of the training machine (tests excluded)"
    valid = d.get("valid_corpus") or f"a fixed hash split of the corpus ({d.get('valid_fraction')} of the files)"
    lines = [
        f"# {name}",
        "",
        "A GPT-2-style causal language model for Python code completion, trained from scratch with "
        "the codecomplete project (Ray Data, Ray Train + Hugging Face `Trainer` + DeepSpeed "
        "ZeRO-2). It completes code from a prefix; it is small and has not been aligned or filtered "
        "for safety: review what it writes.",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        "complete = pipeline(\"text-generation\", model=\"PATH_OR_HUB_ID\")",
        "print(complete(\"def fibonacci(n):\", max_new_tokens=32, do_sample=False)[0][\"generated_text\"])",
        "```",
        "",
    ]
    if not config or not run:  # a model folder without its run's records: say so, invent nothing
        return "\n".join(lines + ["## Training", "", "Unknown: no `run.json` / `run_state.json` of the training "
                                   "run beside this model folder.", ""] + evaluation_section(evaluation))
    lines += [
        "## Training data",
        "",
        f"- Corpus: `{corpus}`",
        f"- Validation: {valid}",
        f"- Filters: {', '.join(filters) or 'none'}; files over {_fmt(d.get('max_file_bytes'))} bytes skipped",
        f"- Files read {_fmt(stats.get('files_read'))}, kept {_fmt(stats.get('files_kept'))} "
        f"(skipped: {skipped}); train {_fmt(stats.get('files_train'))} / valid {_fmt(stats.get('files_valid'))} files",
        f"- Chunks of {_fmt(d.get('context_length'))} tokens ({d.get('chunking')}): "
        f"{_fmt(stats.get('chunks_train'))} train, {_fmt(stats.get('chunks_valid'))} valid",
        "",
        "## Tokenizer",
        "",
        (f"Byte-level BPE trained by the job on up to {_fmt(d.get('tokenizer_train_files'))} training files"
         if not d.get("tokenizer") else f"Given: `{d['tokenizer']}`")
        + f"; vocabulary {_fmt(stats.get('vocab_size') or d.get('vocab_size'))}, `<|endoftext|>` as bos/eos/pad.",
        "",
        *fim_section(d),
        "## Architecture",
        "",
        f"GPT-2 (`GPT2LMHeadModel`): {m.get('n_layer')} layers, {m.get('n_head')} heads, width {m.get('n_embd')}, "
        f"context {d.get('context_length')}, dropout {m.get('dropout')}; {_fmt(run.get('parameters'))} parameters.",
        "",
        "## Training",
        "",
        "| hyperparameter | value |",
        "|---|---|",
    ]
    per_step = run.get("tokens_per_step")
    # run.json has the batch the plan derived (grad accumulation = global / (micro x workers)).
    micro = run.get("micro_batch_size", t.get("micro_batch_size"))
    accum = run.get("gradient_accumulation_steps", t.get("gradient_accumulation_steps"))
    rows = [("micro batch x grad accumulation x workers", f"{micro} x {accum} x {run.get('workers')}"),
            ("tokens per optimizer step", _fmt(per_step)),
            ("learning rate, schedule", f"{t.get('learning_rate')}, {t.get('lr_scheduler_type')}, "
                                        f"warmup {t.get('warmup_steps')} steps"),
            ("weight decay", t.get("weight_decay")),
            ("optimizer steps", f"{_fmt(run.get('steps'))} of {_fmt(run.get('max_steps'))}"),
            ("training tokens", _fmt(run.get("train_tokens"))),
            ("precision", run.get("precision")),
            ("seed", t.get("seed"))]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += [
        "",
        f"Hardware: {run.get('workers')} {str(run.get('device', '?')).upper()} worker(s), DeepSpeed ZeRO stage "
        f"{run.get('zero_stage')}; {_fmt(run.get('tokens_per_s'), 1)} tokens/s, "
        f"{_fmt(run.get('train_seconds'), 0)} s of training ({_fmt(run.get('wall_time_s'), 0)} s in all).",
        "",
        "## Results",
        "",
        "| | value |",
        "|---|---|",
        f"| final train loss | {_fmt(run.get('final_train_loss'))} |",
        f"| final eval loss | {_fmt(run.get('final_eval_loss'))} |",
        f"| final eval perplexity | {_fmt(run.get('final_eval_perplexity'), 2)} |",
        f"| exported checkpoint | step {_fmt((run.get('exported') or {}).get('step'))}, eval loss "
        f"{_fmt((run.get('exported') or {}).get('eval_loss'))} |",
        "",
        "Losses are nats per token of this model's own tokenizer: not comparable across tokenizers or corpora.",
        "",
    ]
    lines += evaluation_section(evaluation)
    return "\n".join(lines)


def evaluation_section(evaluation: Optional[dict[str, Any]]) -> list[str]:
    if not evaluation:
        return ["## Evaluation", "", "Not evaluated yet: `python training/eval/evaluate.py --checkpoint OUTPUT/model "
                "--humaneval --report DIR` adds the results to this card.", ""]
    lines = ["## Evaluation", "", "From `training/eval/evaluate.py --report`.", ""]
    ppl = evaluation.get("perplexity")
    if ppl:
        lines += [f"- Held-out loss {_fmt(ppl.get('loss'))}, perplexity {_fmt(ppl.get('perplexity'), 2)} on "
                  f"{_fmt(ppl.get('tokens'))} tokens of {ppl.get('corpus') or 'the training run'} "
                  f"({ppl.get('split')})"]
    he = evaluation.get("humaneval")
    if he:
        s = he.get("sampling", {})
        ks = ", ".join(f"{k} {100 * v:.2f}%" for k, v in sorted(he.get("pass_at_k", {}).items()) if v is not None)
        lines += [f"- HumanEval ({he.get('problems')} problems, n={he.get('samples_per_problem')}, "
                  f"T={s.get('temperature')}, top_p={s.get('top_p')}): {ks}"]
    lines.append("")
    return lines


def fim_section(d: dict[str, Any]) -> list[str]:
    """Whether (and how) the model fills in the middle: editors need the format to use it."""
    rate = float(d.get("fim_rate") or 0)
    if rate <= 0:
        return ["Trained left to right only: it cannot fill in the middle (a `suffix` is refused by the service).", ""]
    return [
        "## Fill in the middle",
        "",
        f"{rate:.0%} of the training chunks were rewritten to fill-in-the-middle form ({d.get('fim_spm_rate', 0.5):.0%} "
        "of those as SPM, the rest as PSM), with StarCoder's sentinels `<fim_prefix>`, `<fim_suffix>`, "
        "`<fim_middle>`, `<fim_pad>` as special tokens (`fim.json` beside the weights). Prompt with "
        "`<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>` and stop at `<|endoftext|>`, or send "
        "`suffix` to the service's `/v1/completions`.",
        "",
    ]


def render(run_dir: str | Path, evaluation: Optional[dict[str, Any]] = None) -> str:
    """The card's text for the run folder OUTPUT (config, run.json, data stats, evaluation)."""
    folder = RunLayout(run_dir)
    config = _read_json(folder.run_state).get("config", {})  # written by training/train/job.py
    run = _read_json(folder.summary)
    stats = _read_json(folder.stats)
    name = config.get("preset") if config.get("preset") not in (None, "custom") else folder.root.name
    name = f"codecomplete-{name}"
    head = yaml.safe_dump(metadata(config, run, evaluation, name), sort_keys=False, allow_unicode=True)
    return f"---\n{head}---\n\n{body(config, run, stats, evaluation, name)}"


def write_model_card(run_dir: str | Path, model_dir: Optional[str | Path] = None,
                     evaluation: Optional[dict[str, Any]] = None) -> Path:
    """Write README.md into the model folder (default OUTPUT/model/)."""
    path = Path(model_dir or RunLayout(run_dir).model) / CARD
    path.write_text(render(run_dir, evaluation), encoding="utf-8")
    return path


def read_metadata(card: str | Path) -> dict[str, Any]:
    """The YAML block of a card (what a hub parses)."""
    text = Path(card).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"{card}: no YAML metadata block")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)]) or {}
