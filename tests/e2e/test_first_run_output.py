"""The first thing a user sees: the README's first job prints its own lines, not the libraries'.

The README job (`training/run.py --preset tiny`, on the embedded stdlib corpus, cut short with
--max-steps and --max-files) runs for real in its own local cluster. Its whole output must
stay short and free of the library noise the project turns off (training/log_noise.py), while
the job's own lines are all there; `--verbose` brings the libraries' lines back. The run also
goes through `precision: auto` on this machine's CPU (bf16 where /proc/cpuinfo has native
bf16, else fp32) and must learn.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.support.ray_cluster import REPO_ROOT
from training.train.cpu_features import bf16_native, read_cpuinfo
from training.train.plan import choose_precision

SHORT = ["--preset", "tiny", "--max-files", "120", "--valid-fraction", "0.1", "--tokenizer-train-files", "60"]
NOISE = ("PlacementGroupCleaner", "exclude_resources", "all_gather_into_tensor", "loss_type=None",
         "Setting accelerator to CPU", "Reporting training result", "Execution plan of Dataset", "it/s]",
         "Processing zero checkpoint")


def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)  # its own local cluster, as on a fresh clone
    return subprocess.run([sys.executable, "training/run.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_job_prints_its_own_lines_and_little_else(tmp_path):
    out = tmp_path / "run"
    r = run([*SHORT, "--max-steps", "4", "--eval-steps", "4", "--save-steps", "4", "--logging-steps", "2",
             "--output", str(out)])
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    lines = log.splitlines()
    print(f"{len(lines)} lines:\n{log}")
    assert len(lines) < 100
    for noise in NOISE:
        assert noise not in log, noise
    for own in ("data: ", "[job] worker probe", "[job] model: ", "[train] step 4/4 | loss", "[train] step 4/4 | eval_loss",
                "[job] done in", "[job] sample: "):
        assert own in log, own
    summary = json.loads((out / "run.json").read_text())
    expected = choose_precision("auto", False, {"cpu_bf16_native": bf16_native(read_cpuinfo()["flags"])})
    assert summary["precision"] == expected
    assert summary["param_dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[expected]  # what the engine ran
    vocab = json.loads((out / "model" / "config.json").read_text())["vocab_size"]
    assert summary["final_eval_loss"] < math.log(vocab)  # it learned: below a uniform guess


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_verbose_brings_the_libraries_lines_back(tmp_path):
    quiet = run([*SHORT, "--prepare-only", "--output", str(tmp_path / "q")])
    loud = run([*SHORT, "--prepare-only", "--verbose", "--output", str(tmp_path / "v")])
    assert quiet.returncode == 0 and loud.returncode == 0, (quiet.stderr[-2000:], loud.stderr[-2000:])
    q, v = quiet.stdout + quiet.stderr, loud.stdout + loud.stderr
    assert "Execution plan of Dataset" in v and "Execution plan of Dataset" not in q  # Ray Data's INFO lines
    assert len(v.splitlines()) > len(q.splitlines())
    assert "data: " in q and "data: " in v  # the job's own summary either way
