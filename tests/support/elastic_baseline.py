"""Regenerate tests/support/elastic_baseline.json: the final eval loss of uninterrupted runs
of the elastic test's config (tests/e2e/test_elastic.py, `elastic_args`), same seed.

    flock /tmp/cc-ray.lock .venv/bin/python -m tests.support.elastic_baseline [--runs 3]

Each run trains on a fixed number of workers on a fresh local Ray cluster. Runs of one world
size came out bit-identical here (the seeded read order and shuffle make them so), so the
noise an elastic run is judged against is not run-to-run jitter but what the world size
itself changes: which chunks each step sees (shards differ) and the order of the gradient
sum. That is measured as the gap between an uninterrupted run on 1 worker and the mean of
the runs on 2; the tolerance is that gap plus the spread of the 2-worker runs, at least
0.05 nats. An elastic run of the same config must land within it of the 2-worker mean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support import REPO_ROOT
from tests.support.corpus import stdlib_files

BASELINE = Path(__file__).with_name("elastic_baseline.json")
MAX_STEPS, GLOBAL, MICRO = 12, 16, 8
PEAK_LR = 2e-3  # pinned, like every other setting the baseline depends on: not the preset's


def elastic_args(corpus: Path, out: Path) -> list[str]:
    """The elastic test's config, shared with the uninterrupted runs of the baseline."""
    return ["--preset", "tiny", "--corpus", str(corpus), "--output", str(out), "--vocab-size", "1000",
            "--tokenizer-train-files", "40", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
            "--global-batch-size", str(GLOBAL), "--micro-batch-size", str(MICRO), "--max-steps", str(MAX_STEPS),
            "--eval-steps", "2", "--save-steps", "2", "--logging-steps", "1", "--warmup-steps", "2",
            "--valid-fraction", "0.1", "--no-gpu", "--report-to", "none",
            # fp32 on every CPU: precision auto is bf16 only where the CPU has it, and the
            # baseline's losses must hold wherever the test runs
            "--precision", "fp32", "--learning-rate", str(PEAK_LR)]


def corpus(root: Path) -> Path:
    """The same 40 files, laid out as conftest's small_corpus fixture lays them."""
    for i, f in enumerate(stdlib_files(40)):
        sub = root / ("pkg_a" if i % 2 else "pkg_b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    return root


def one_run(workers: int, tmp: Path, i: int) -> float:
    out = tmp / f"run{i}_{workers}w"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    r = subprocess.run([sys.executable, "training/run.py", *elastic_args(tmp / "corpus", out),
                        "--num-workers", str(workers)], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stdout[-3000:] + r.stderr[-3000:])
    return json.loads((out / "run.json").read_text())["final_eval_loss"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3, help="uninterrupted runs on 2 workers")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        corpus(tmp / "corpus")
        two = [one_run(2, tmp, i) for i in range(a.runs)]
        one = one_run(1, tmp, a.runs)
    mean = statistics.mean(two)
    spread = max(two) - min(two)
    tolerance = round(max(0.05, spread + abs(one - mean)), 4)
    BASELINE.write_text(json.dumps({"mean": round(mean, 4), "tolerance": tolerance,
                               "uninterrupted_2_workers": two, "uninterrupted_1_worker": one,
                               "how": "python -m tests.support.elastic_baseline"}, indent=2) + "\n")
    print(BASELINE.read_text())


if __name__ == "__main__":
    main()
