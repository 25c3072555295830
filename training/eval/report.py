"""The evaluation report: results JSON, a short Markdown with the numbers beside published
anchors, and the training run's loss curve when a run folder is known."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from training.layout import LOSS_PLOT_FILE, RunLayout

# Published reference points, so a reader sees where a model stands. They are only directly
# comparable under the same conditions (data, tokenizer, context, sampling), which the
# Markdown says next to them.
ANCHORS: dict[str, dict[str, Any]] = {
    "codeparrot-small": {
        "what": "CodeParrot-small (110M parameters, ~29B training tokens), HumanEval",
        "pass@1": 0.0380, "pass@10": 0.0657, "pass@100": 0.1278,
        "source": "huggingface.co/codeparrot/codeparrot-small model card",
    },
    "course-codeparrot-ds": {
        "what": "Hugging Face course recipe (GPT-2 124M, 128-token context) on codeparrot-ds, validation",
        "loss": 1.06, "perplexity": round(math.exp(1.06), 2),
        "source": "huggingface.co/learn/llm-course, chapter 7.6",
    },
}


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def markdown(results: dict[str, Any], loss_png: Optional[str]) -> str:
    lines = ["# Evaluation report", ""]
    src = results.get("checkpoint") or results.get("endpoint")
    lines += [f"Model: `{src}`" + (f" ({results['parameters']:,} parameters)" if results.get("parameters") else ""), ""]
    ppl = results.get("perplexity")
    if ppl:
        a = ANCHORS["course-codeparrot-ds"]
        lines += ["## Validation loss", "",
                  "| | corpus | loss | perplexity | tokens |", "|---|---|---|---|---|",
                  f"| **this model** | {ppl.get('corpus') or 'stdlib (default)'} ({ppl.get('split')}) "
                  f"| {ppl['loss']:.4f} | {ppl['perplexity']:.2f} | {ppl['tokens']:,} |",
                  f"| anchor: {a['what']} | codeparrot-ds valid | ~{a['loss']:.2f} | ~{a['perplexity']:.2f} | |", "",
                  "Loss is per token of the model's own tokenizer: numbers on other corpora or "
                  "tokenizers are not directly comparable.", ""]
    he = results.get("humaneval")
    if he:
        a = ANCHORS["codeparrot-small"]
        k = he["pass_at_k"]
        s = he.get("sampling", {})
        lines += ["## HumanEval", "",
                  "| | problems | n | pass@1 | pass@10 | pass@100 |", "|---|---|---|---|---|---|",
                  f"| **this model** (T={s.get('temperature')}, top_p={s.get('top_p')}, "
                  f"max_new_tokens={s.get('max_new_tokens')}) | {he['problems']} | {he['samples_per_problem']} "
                  f"| {_pct(k.get('pass@1'))} | {_pct(k.get('pass@10'))} | {_pct(k.get('pass@100'))} |",
                  f"| anchor: {a['what']} | 164 | | {_pct(a['pass@1'])} | {_pct(a['pass@10'])} | {_pct(a['pass@100'])} |",
                  "", "pass@k is reported only for k <= n (unbiased estimator, Chen et al. 2021). "
                  f"Outcomes: {he.get('status_counts')}."]
        if he.get("prompts_truncated"):
            lines += [f"{he['prompts_truncated']} prompts were longer than the model's context allows "
                      "and kept only their end."]
        lines.append("")
    if loss_png:
        lines += ["## Training run", "", f"![loss curve]({loss_png})", ""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, results: dict[str, Any], run_dir: Optional[str | Path] = None) -> dict[str, str]:
    """Write eval.json, report.md and (with a training run folder) loss.png under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "eval.json"), "markdown": str(out / "report.md")}
    loss_png = None
    if run_dir is not None:
        from training.train.metrics import plot_loss, read_metrics

        events = read_metrics(RunLayout(run_dir).metrics)
        if events:
            plot_loss(events, out / LOSS_PLOT_FILE, title=f"training run {Path(run_dir).name}")
            loss_png = LOSS_PLOT_FILE
            paths["loss_curve"] = str(out / LOSS_PLOT_FILE)
    results = {**results, "anchors": ANCHORS}
    Path(paths["json"]).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    Path(paths["markdown"]).write_text(markdown(results, loss_png), encoding="utf-8")
    return paths
