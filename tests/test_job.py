"""The training job for real: Ray Train workers, DeepSpeed ZeRO-2, checkpoints, restarts.

Every run here is tiny (2 layers, 64 wide, vocab 1,000, a few steps on 40 stdlib files)
but goes through the whole path a user's run takes: `training/run.py`, the data stage,
TorchTrainer with 2 CPU workers, Ray Train checkpoints, the export to OUTPUT/model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_cluster import REPO_ROOT, LocalRayHead
from training.config import ConfigError, JobConfig
from training.job import cluster_capacity, load_deepspeed_config, plan_steps, plan_workers  # noqa: F401

RUN = [sys.executable, "training/run.py"]


def tiny_args(corpus: Path, out: Path, max_steps: int = 6, every: int = 2) -> list[str]:
    return ["--preset", "tiny", "--corpus", str(corpus), "--output", str(out), "--vocab-size", "1000",
            "--tokenizer-train-files", "40", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
            "--micro-batch-size", "8", "--max-steps", str(max_steps), "--eval-steps", str(every),
            "--save-steps", str(every), "--logging-steps", "1", "--warmup-steps", "2", "--valid-fraction", "0.1"]


def run_cli(args: list[str], env: dict | None = None, timeout: float = 1100) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_ADDRESS": "", **(env or {})}
    full_env.pop("RAY_ADDRESS")  # a fresh local cluster per run, never someone else's
    return subprocess.run([*RUN, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def events(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def assert_servable(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, pipeline

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.config.n_layer == 2 and model.config.n_positions == 128
    gen = pipeline("text-generation", model=str(model_dir), device="cpu")
    assert gen("import os\n", max_new_tokens=5, do_sample=False)[0]["generated_text"].startswith("import os\n")


# ---- no cluster: checks and plans ---------------------------------------------------------------


def test_deepspeed_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_deepspeed_config(str(bad))
    bad.write_text('{"zero_optimization": {"stage": 7}}')
    with pytest.raises(ConfigError, match="stage must be"):
        load_deepspeed_config(str(bad))
    bad.write_text('{"train_batch_size": "auto"}')
    with pytest.raises(ConfigError, match="train_batch_size"):
        load_deepspeed_config(str(bad))
    assert load_deepspeed_config("configs/deepspeed/zero2.json")["zero_optimization"]["stage"] == 2


def test_cli_rejects_a_deepspeed_config_that_does_not_parse(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    r = run_cli(["--preset", "tiny", "--deepspeed-config", str(bad), "--output", str(tmp_path / "o")], timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: train.deepspeed_config")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # failed before doing anything


def test_worker_plan_uses_the_autoscalers_maximum():
    cfg = JobConfig.from_preset("tiny")
    cap = {"CPU": 4.0, "GPU": 0.0, "CPU_now": 4.0, "GPU_now": 0.0, "autoscaling": 0.0}
    assert plan_workers(cfg, cap) == (2, False)
    # A 0-CPU head that may scale to 4 CPUs is accepted; the check counts the maximum.
    scaling = {"CPU": 4.0, "GPU": 0.0, "CPU_now": 0.0, "GPU_now": 0.0, "autoscaling": 1.0}
    cfg.train.num_workers = 3
    assert plan_workers(cfg, scaling) == (3, False)
    cfg.train.num_workers = 5
    with pytest.raises(ConfigError, match=r"train.num_workers=5: needs 5 CPUs .* at most 4 \(autoscaler max"):
        plan_workers(cfg, scaling)
    cfg.train.num_workers = None
    gpus = {"CPU": 32.0, "GPU": 4.0, "CPU_now": 32.0, "GPU_now": 4.0, "autoscaling": 0.0}
    assert plan_workers(cfg, gpus) == (4, True)  # one worker per GPU by default
    cfg.train.use_gpu = True
    with pytest.raises(ConfigError, match="no GPUs"):
        plan_workers(cfg, cap)


def test_step_plan_is_one_epoch_of_the_effective_batch():
    cfg = JobConfig.from_preset("tiny")
    # Pin the batch shape so the test does not follow edits to the tiny preset.
    cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps = 16, 1
    assert plan_steps(cfg, {"chunks_train": 3200, "chunks_valid": 10}, workers=2) == 100
    cfg.train.gradient_accumulation_steps = 4
    assert plan_steps(cfg, {"chunks_train": 3200, "chunks_valid": 10}, workers=2) == 25
    cfg.train.max_steps = 7
    assert plan_steps(cfg, {"chunks_train": 3200, "chunks_valid": 10}, workers=2) == 7
    cfg.train.max_steps = None
    with pytest.raises(ConfigError, match="fewer than one optimizer step"):
        plan_steps(cfg, {"chunks_train": 100, "chunks_valid": 10}, workers=2)
    with pytest.raises(ConfigError, match="validation split has 1 chunks"):
        plan_steps(cfg, {"chunks_train": 3200, "chunks_valid": 1}, workers=2)


# ---- bad input against a real (local) cluster ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_too_many_workers_and_an_empty_corpus_fail_before_training(tmp_path):
    r = run_cli(["--preset", "tiny", "--num-workers", "64", "--output", str(tmp_path / "o1")], timeout=330)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: train.num_workers=64: needs 64 CPUs" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o1" / "data").exists()  # rejected before the data stage

    corpus = tmp_path / "short"
    corpus.mkdir()
    (corpus / "a.py").write_text("x = 1\n")
    r = run_cli(["--preset", "tiny", "--corpus", str(corpus), "--vocab-size", "300",
                 "--output", str(tmp_path / "o2")], timeout=330)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: data.corpus" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o2" / "ray_results").exists()  # no training started


# ---- the real job --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def submitted_run(small_corpus, tmp_path_factory):
    """`ray job submit --working-dir . -- python training/run.py ...` against a real head."""
    out = tmp_path_factory.mktemp("job") / "run"
    with LocalRayHead(num_cpus=4) as head:
        for _ in range(12):  # the head's job agent can come up after the API answers (loaded machine)
            r = head.submit("python", "training/run.py", *tiny_args(small_corpus, out, max_steps=6, every=3),
                            timeout=900)
            if "No available agent to submit job" not in r.stdout + r.stderr:
                break
            time.sleep(5)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    return out, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ray_job_submit_trains_and_exports_a_loadable_model(submitted_run):
    out, log = submitted_run
    assert "succeeded" in log.lower()
    assert "[train] step 6/6" in log  # the progress line reached the user
    run = json.loads((out / "run.json").read_text())
    assert run["workers"] == 2 and run["device"] == "cpu" and run["zero_stage"] == 2 and run["steps"] == 6
    assert run["train_tokens"] == 6 * 2 * 8 * 128 and run["tokens_per_s"] > 0
    assert run["final_eval_loss"] < 6.9  # ln(1000): better than uniform over the vocabulary
    ev = events(out)
    assert any("eval_loss" in e and "eval_perplexity" in e for e in ev)
    assert any("loss" in e and "learning_rate" in e for e in ev if e["event"] == "log")
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert_servable(out / "model")
    # Ray Train kept the checkpoints (keep 2 best by eval loss), each with both ranks' ZeRO shards.
    ckpts = sorted(p for p in Path(run["storage_path"], run["run_name"]).glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(ckpts) <= 2
    names = {p.name for p in ckpts[-1].rglob("*optim_states.pt")}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_workers_hold_identical_parameters_after_training(submitted_run):
    out, _ = submitted_run
    digests = [e for e in events(out) if e["event"] == "param_digest"]
    begin = {e["rank"]: e["digest"] for e in digests if e["phase"] == "begin"}
    end = {e["rank"]: e["digest"] for e in digests if e["phase"] == "end"}
    assert set(begin) == set(end) == {0, 1}
    assert len(set(end.values())) == 1, "ranks diverged: gradients were not reduced"
    assert set(begin.values()).isdisjoint(end.values()), "training did not change the weights"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_worker_restarts_from_the_latest_checkpoint(small_corpus, tmp_path):
    out = tmp_path / "run"
    r = run_cli([*tiny_args(small_corpus, out, max_steps=6, every=2), "--max-failures", "2"],
                env={"CODECOMPLETE_FAIL_AT_STEP": "5"})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert (out / "failure_injected.txt").is_file()  # a worker process really died
    run = json.loads((out / "run.json").read_text())
    starts = [a["start_step"] for a in run["attempts"]]
    assert len(starts) == 2 and starts[0] == 0
    assert 0 < starts[1] <= 4  # from a checkpoint (2 or 4), not from scratch
    assert run["steps"] == 6
    assert_servable(out / "model")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_resume_continues_a_stopped_run_from_its_latest_checkpoint(small_corpus, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(small_corpus, out, max_steps=6, every=2)
    first = run_cli([*args, "--max-failures", "0"], env={"CODECOMPLETE_FAIL_AT_STEP": "5"})
    assert first.returncode != 0  # the run stopped (a worker died, no retries allowed)
    assert not (out / "run.json").exists()
    second = run_cli(["--preset", "tiny", "--resume", str(out), *args[2:]])
    assert second.returncode == 0, (second.stdout[-3000:], second.stderr[-3000:])
    run = json.loads((out / "run.json").read_text())
    starts = [a["start_step"] for a in run["attempts"]]
    assert starts[0] == 0 and starts[-1] in (2, 4)
    assert run["resumed_from_step"] == starts[-1] and run["steps"] == 6
    assert "data: reusing" in second.stdout + second.stderr  # the data stage was not redone
