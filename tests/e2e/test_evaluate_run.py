"""The evaluation CLI end to end: perplexity on a Ray Data job, results, report and loss curve."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT  # noqa: E402

REPO = REPO_ROOT


def _cli(*args: str, timeout: float = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, str(REPO / "training" / "eval" / "evaluate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(900)
def test_full_run_writes_results_report_and_loss_curve(tiny_checkpoint, small_corpus, tmp_path):
    # A training run's OUTPUT folder: model/ plus metrics.jsonl as the job writes it.
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run / "model")
    events = [{"event": "log", "step": s, "loss": 6.0 - s / 20} for s in range(10, 61, 10)]
    events += [{"event": "log", "step": 30, "eval_loss": 5.2}, {"event": "log", "step": 60, "eval_loss": 4.9}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    report = tmp_path / "report"

    r = _cli("--checkpoint", str(run), "--corpus", str(small_corpus), "--max-chunks", "24",
             "--humaneval", "--problems", "2", "--n", "2", "--max-new-tokens", "16", "--temperature", "0.8",
             "--report", str(report), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = json.loads(r.stdout[r.stdout.index("{\n"):])
    saved = json.loads((report / "eval.json").read_text())
    assert saved["perplexity"] == printed["perplexity"]

    ppl = saved["perplexity"]
    assert ppl["chunks"] == 24 and ppl["tokens"] == 24 * 127 and ppl["split"] == "all"
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl["loss"]), rel=1e-9)
    assert 0 < ppl["loss"] < 10
    he = saved["humaneval"]
    assert he["problems"] == 2 and he["samples_per_problem"] == 2
    assert set(he["pass_at_k"]) == {"pass@1"}  # pass@10 needs n >= 10
    assert sum(he["status_counts"].values()) == 4  # 2 samples generated per problem on Ray actors
    assert he["prompts_truncated"] == 2  # both prompts exceed 128 - 16 tokens: their end is kept
    assert he["sandbox"]["timeout_s"] == 5.0
    assert saved["anchors"]["codeparrot-small"]["pass@1"] == pytest.approx(0.038)

    md = (report / "report.md").read_text()
    for needle in ("3.80%", "6.57%", "12.78%", "~1.06", f"{ppl['loss']:.4f}", "loss.png"):
        assert needle in md
    assert (report / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The run's model folder now carries the results in its card (hub metadata included).
    from training.export.model_card import read_metadata

    card = (run / "model" / "README.md").read_text()
    assert "## Evaluation" in card and f"{ppl['loss']:.4f}" in card and "HumanEval (2 problems, n=2" in card
    meta = read_metadata(run / "model" / "README.md")
    assert "code_eval" in meta["metrics"]
    he_result = meta["model-index"][0]["results"][-1]
    assert he_result["dataset"]["name"] == "HumanEval" and he_result["metrics"][0]["type"] == "pass@1"
