"""End to end on a real autoscaling Ray cluster (Ray's fake multi-node provider).

The head has 0 CPUs and the cluster starts with no worker nodes, so the tiny training job
(2 Ray Train workers, Ray Data preprocessing) can only run once the autoscaler has added
1-CPU worker nodes. The job goes in with `ray job submit --working-dir .`, as on a cloud
cluster, writes checkpoints to `--storage-path`, and its exported model must load with
`transformers`. The cluster is always stopped (fixture finalizer), and the test checks that
none of its processes outlive it.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time

import pytest

from tests.support.fake_cluster import WORKER_TYPE, FakeAutoscalingCluster, start_fake_cluster

pytestmark = pytest.mark.slow

# Three 1-CPU nodes at most: two training workers hold one CPU each while Ray Data still
# needs one to stream the training split to them (a pipeline with no free CPU stalls
# forever: docs/training.md, "CPU budgeting").
MAX_WORKERS = 3
TEST_TIMEOUT_S = 600      # pytest-timeout's hard stop: a bound for hangs, not the expected time
TEARDOWN_MARGIN_S = 60    # left for stopping the cluster and checking for stragglers


@pytest.fixture
def autoscaling_cluster():
    cluster = start_fake_cluster(max_workers=MAX_WORKERS)  # stops what it started if it fails
    try:
        yield cluster
    finally:
        cluster.cleanup()
        left = cluster.stragglers()
        assert not left, f"processes of the fake cluster outlived it: {left}"


def added_nodes(cluster: FakeAutoscalingCluster) -> int:
    """How many worker nodes the autoscaler says it launched ('Adding N node(s) of type T')."""
    return sum(int(n) for n in re.findall(rf"Adding (\d+) node\(s\) of type {re.escape(WORKER_TYPE)}",
                                          cluster.monitor_log()))


def actors_of_class(cluster: FakeAutoscalingCluster, class_name: str) -> list[dict]:
    """Actors the GCS knows (alive or dead) of one class, with the node each ran on."""
    actors = cluster.api("/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]
    return [a for a in actors if a.get("class_name") == class_name]


def submit_tiny_job(cluster: FakeAutoscalingCluster, corpus, out, store, timeout: float):
    """The tiny training job with 2 CPU workers, as a user would submit it to a cluster."""
    return cluster.submit(
        "python", "training/run.py", "--preset", "tiny",
        "--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--vocab-size", "500",
        "--valid-fraction", "0.25", "--max-steps", "4", "--micro-batch-size", "8", "--global-batch-size", "16",
        "--eval-steps", "4", "--save-steps", "4", "--logging-steps", "1", "--warmup-steps", "1",
        "--num-workers", "2", "--no-gpu", "--corpus", str(corpus),
        "--output", str(out), "--storage-path", str(store), timeout=timeout)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_training_job_trains_on_nodes_the_autoscaler_adds(autoscaling_cluster, small_corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cluster = autoscaling_cluster
    deadline = cluster.created_at + TEST_TIMEOUT_S - TEARDOWN_MARGIN_S
    assert cluster.worker_nodes() == [], "the cluster must start with the head alone"
    head = {n["node_id"] for n in cluster.nodes() if n["is_head_node"]}
    out, store = tmp_path / "run", tmp_path / "shared_storage"

    try:
        result = submit_tiny_job(cluster, small_corpus, out, store, timeout=max(30.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"job not done by the test's deadline; driver log tail:\n{cluster.driver_logs()[-6000:]}\n"
                    f"autoscaler log tail:\n{cluster.monitor_log()[-2000:]}")
    logs = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in logs, logs[-5000:]

    # The job saw how far the cluster may grow (published by deploy/publish_cluster_config.py,
    # as raycluster.yaml's head does): 0 CPUs when it started, up to MAX_WORKERS x 1 CPU.
    plan = re.search(r"\[job\] cluster: (\S+) CPUs, \S+ GPUs now \(max (\S+)/", logs)
    assert plan and float(plan.group(1)) < 2 and float(plan.group(2)) == MAX_WORKERS, logs[-5000:]

    # The storage probe ran where the workers run, never on the 0-CPU head: it read the
    # prepared data and the token the driver wrote under --storage-path from the added nodes.
    probed = re.search(r"\[job\] worker probe: \d+ task\(s\) on node\(s\) (\S+(?:, \S+)*) read", logs)
    assert probed, logs[-5000:]
    probe_nodes = set(probed.group(1).split(", "))
    assert probe_nodes and not probe_nodes & head, (probe_nodes, head)
    assert probe_nodes <= {n["node_id"] for n in cluster.worker_nodes(alive_only=False)}

    # The autoscaler added the nodes, and the training workers ran on two of them.
    assert added_nodes(cluster) >= 2, cluster.monitor_log()[-3000:]
    workers = actors_of_class(cluster, "RayTrainWorker")
    worker_nodes = {a["node_id"] for a in workers}
    assert len(workers) >= 2 and len(worker_nodes) >= 2, workers
    assert not worker_nodes & head, "a training worker ran on the 0-CPU head"
    assert worker_nodes <= {n["node_id"] for n in cluster.worker_nodes(alive_only=False)}

    # Checkpoints went to --storage-path; the exported model loads and predicts.
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 4 and run["workers"] == 2
    assert any(p.is_dir() for p in store.rglob("checkpoint_*")), f"no checkpoint under --storage-path {store}"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    ids = tok("def main():\n    return", return_tensors="pt").input_ids
    loss = model(input_ids=ids, labels=ids).loss
    assert model.config.n_layer == 1 and model.config.n_embd == 64
    assert loss.isfinite() and loss.item() < 2 * math.log(model.config.vocab_size)
