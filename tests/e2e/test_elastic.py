"""Elastic training on a real autoscaling Ray cluster (Ray's fake multi-node provider):
a run on `--num-workers 1-2` starts on 2 workers, loses a node (every process of it
SIGKILLed), goes on with 1, and grows back to 2 when the autoscaler has replaced the node.

The cluster starts with 2 one-CPU worker nodes (min_workers=2); once the run has shrunk, a
replacement node joins (the test starts it: Ray's fake provider never notices a node it
launched has died, so its autoscaler never replaces one). Each training worker reserves
0.75 CPU, so one fits per node and the rest of the node is left to Ray Data's reads.

What must hold across the two changes of world size (docs/training.md, "Elastic workers"):
the global batch (micro x workers x accumulation = 16 in every attempt), the step count and
the learning-rate schedule (every logged rate on the one cosine curve of max_steps), the
count of chunks the last attempt drew (max_steps x the global batch over its ranks), the
ZeRO-2 optimizer state (its sums at each restart equal those saved with that checkpoint, on
the other world size), and the final eval loss, within the noise of uninterrupted runs of the
same config and seed (tests/support/elastic_baseline.json).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.support.elastic_baseline import BASELINE, GLOBAL, MAX_STEPS, MICRO, PEAK_LR, elastic_args
from tests.support.fake_cluster import start_fake_cluster

pytestmark = pytest.mark.slow

EVERY, KILL_AFTER_STEP = 2, 3
TEST_TIMEOUT_S = 600  # a bound for hangs; the run takes a fraction of it


@pytest.fixture
def elastic_cluster(tmp_path):
    # Fast failure detection, so that the test measures the job and not Ray's timeouts: the
    # GCS marks a silent node dead after ~3 s, and a worker group whose placement cannot be
    # met (Ray Data's coordinator still counting the dead node) is retried after 5 s, not 60
    # (the timeout covers only the wait for the placement group).
    cluster = start_fake_cluster(max_workers=2, min_workers=2, env={
        "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
        "RAY_health_check_initial_delay_ms": "1000", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"})
    try:
        yield cluster
    finally:
        if os.environ.get("CC_KEEP_CLUSTER_LOGS"):  # debugging: the session's logs outlive the cluster
            shutil.copytree(Path(cluster.temp_dir) / "session_latest" / "logs", tmp_path / "cluster_logs",
                            ignore_dangling_symlinks=True, dirs_exist_ok=True)
        cluster.cleanup()
        assert not cluster.stragglers(), "processes of the fake cluster outlived it"


def read_events(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]


def registered_steps(out: Path) -> list[int]:
    """Steps of the checkpoints Ray Train's checkpoint manager has registered (its snapshot)."""
    import re

    state = out / "run_state.json"
    if not state.is_file():
        return []
    run = json.loads(state.read_text())
    snap = Path(run["storage_path"], run["run_name"], "checkpoint_manager_snapshot.json")
    try:
        return sorted({int(s) for s in re.findall(r'"step":\s*(\d+)', snap.read_text())})
    except OSError:
        return []


def wait_for(cond, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def cosine_rates(max_steps: int, warmup: int, peak: float) -> dict[int, float]:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_cosine_schedule_with_warmup(opt, warmup, max_steps)
    rates = {}
    for step in range(1, max_steps + 1):  # HF logs the rate the step's update used
        rates[step] = sched.get_last_lr()[0]
        opt.step()
        sched.step()
    return rates


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_an_elastic_run_shrinks_when_a_node_dies_and_grows_back(elastic_cluster, small_corpus, tmp_path):
    cluster = elastic_cluster
    wait_for(lambda: len(cluster.worker_nodes()) == 2, 120, "the 2 worker nodes of the cluster")
    out = tmp_path / "run"
    args = [*elastic_args(small_corpus, out), "--num-workers", "1-2", "--cpus-per-worker", "0.75",
            "--resize-interval-s", "3", "--max-failures", "3", "--stall-timeout", "180"]
    # On 1 worker, steps are paced so that the replaced node is back before the run ends.
    env = ("env", "CODECOMPLETE_TRAIN_PLUGINS=tests.support.train_faults:pace", "TRAIN_FAULT_PACE_S=5",
           "TRAIN_FAULT_PACE_BELOW=2")
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(r=cluster.submit(*env, "python", "training/run.py", *args,
                                                                         timeout=TEST_TIMEOUT_S - 60)))
    job.start()

    # Kill the node of a training worker once the 2-worker attempt has a checkpoint that Ray
    # Train registered (uploads are asynchronous: a save is not yet a checkpoint).
    def past_checkpoint():
        ev = read_events(out)
        two = any(e["event"] == "attempt_start" and e["world_size"] == 2 for e in ev)
        return two and registered_steps(out) and any(e["event"] == "log" and e.get("step", 0) >= KILL_AFTER_STEP
                                                     for e in ev)

    try:
        wait_for(lambda: past_checkpoint() or not job.is_alive(), TEST_TIMEOUT_S - 120, "step 3 on 2 workers")
        assert job.is_alive(), result.get("r") and (result["r"].stdout[-3000:] + result["r"].stderr[-3000:])
        workers = [a for a in cluster.api("/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]
                   if a.get("class_name") == "RayTrainWorker" and a.get("state") == "ALIVE"]
        victim = sorted(a["node_id"] for a in workers)[-1]
        killed = cluster.kill_node(victim)
        assert killed, f"no process of node {victim} found"
        # The run goes on with 1 worker; then a replacement machine joins.
        wait_for(lambda: any(e["event"] == "attempt_start" and e["world_size"] == 1 for e in read_events(out))
                 or not job.is_alive(), TEST_TIMEOUT_S - 180, "the attempt on 1 worker")
        cluster.add_node(cpus=1)
    finally:
        job.join(TEST_TIMEOUT_S - 60)
    r = result["r"]
    logs = r.stdout + r.stderr
    (tmp_path / "job.log").write_text(logs)
    assert r.returncode == 0 and "succeeded" in logs, logs[-6000:]

    ev = read_events(out)
    run = json.loads((out / "run.json").read_text())
    attempts = [e for e in ev if e["event"] == "attempt_start"]
    sizes = [a["world_size"] for a in attempts]
    # Started on 2, went on with 1 after the node died, grew back to 2.
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2 and sizes.index(1) < len(sizes) - 1, sizes
    assert "re-sharding the ZeRO-2 optimizer state" in logs  # both changes went through the universal checkpoint

    # The global batch in every attempt; accumulation derived from its world size.
    for a in attempts:
        assert a["micro_batch_size"] * a["world_size"] * a["gradient_accumulation_steps"] == GLOBAL, a
    assert [(a["world_size"], a["gradient_accumulation_steps"]) for a in run["attempts"]] == \
        [(a["world_size"], a["gradient_accumulation_steps"]) for a in attempts]

    # Each restart continued from a checkpoint (a multiple of save_steps), never from scratch;
    # the step count is the plan's.
    starts = [a["start_step"] for a in attempts]
    assert starts[0] == 0 and all(s > 0 and s % EVERY == 0 for s in starts[1:]), starts
    assert starts == sorted(starts) and run["steps"] == MAX_STEPS == run["max_steps"]

    # One schedule: every rate logged, in any attempt, is the cosine curve's at that step.
    rates = cosine_rates(MAX_STEPS, 2, PEAK_LR)
    logged = [e for e in ev if e["event"] == "log" and "learning_rate" in e]
    assert {e["step"] for e in logged} == set(range(1, MAX_STEPS + 1))
    for e in logged:
        assert e["learning_rate"] == pytest.approx(rates[e["step"]], rel=1e-6, abs=1e-12), e

    # Chunks: the last attempt re-read its shards from the start, skipped start_step x accum
    # micro-batches and trained on the rest: max_steps x accum micro-batches per rank, so
    # max_steps x the global batch over its ranks.
    last = [e for e in ev if e["event"] == "stream"]
    assert len(last) == 2 and {e["rank"] for e in last} == {0, 1}
    assert sum(e["batches_read"] for e in last) * MICRO == MAX_STEPS * GLOBAL

    # The ZeRO-2 optimizer state came back whole on the other world size: its sums at each
    # restart equal those of the checkpoint it started from, saved by the other size.
    seen: dict[int, dict] = {}
    for e in ev:
        if e["event"] == "optimizer_state" and e["phase"] == "save":
            seen[e["step"]] = e  # the last save at a step is the checkpoint a restart loads
        elif e["event"] == "optimizer_state" and e["phase"] == "begin" and e["step"] > 0:
            saved = seen[e["step"]]
            assert e["adam_step"] == saved["adam_step"] == e["step"]
            for key in ("master_sq", "exp_avg_sq_norm", "exp_avg_sq_sq"):
                assert saved[key] > 0 and e[key] == pytest.approx(saved[key], rel=1e-6), (key, e, saved)

    # The final eval loss is within the noise of uninterrupted runs of the same config.
    base = json.loads(BASELINE.read_text())
    assert abs(run["final_eval_loss"] - base["mean"]) <= base["tolerance"], (run["final_eval_loss"], base)
