"""End to end on a real autoscaling Ray cluster (Ray's fake multi-node provider).

The head has 0 CPUs and the cluster starts with no worker nodes, so anything that needs a
CPU can only run once the autoscaler has added 1-CPU worker nodes. Jobs go in with
`ray job submit --working-dir .`, exactly as on a cloud cluster. Every test stops the
cluster it started (fixture finalizer) and checks that none of its processes outlive it.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from fake_cluster import WORKER_TYPE, FakeAutoscalingCluster

pytestmark = pytest.mark.slow

# Two 1-CPU tasks held at once: on a 0-CPU head they need two worker nodes.
TWO_NODE_PROBE = """
import json, time, ray
ray.init()
@ray.remote(num_cpus=1)
def where():
    time.sleep(2)  # overlap, so the two tasks cannot share one 1-CPU node
    return ray.get_runtime_context().get_node_id()
print("NODES=" + json.dumps(sorted(set(ray.get([where.remote(), where.remote()])))))
from ray._private.state import state  # the ceiling deploy/publish_cluster_config.py published
print("MAX=" + json.dumps(state.get_max_resources_from_cluster_config()))
"""


@pytest.fixture
def autoscaling_cluster():
    cluster = FakeAutoscalingCluster(max_workers=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()
        left = cluster.stragglers()
        assert not left, f"processes of the fake cluster outlived it: {left}"


def added_nodes(cluster: FakeAutoscalingCluster) -> int:
    """How many worker nodes the autoscaler says it launched ('Adding N node(s) of type T')."""
    return sum(int(n) for n in re.findall(rf"Adding (\d+) node\(s\) of type {re.escape(WORKER_TYPE)}",
                                          cluster.monitor_log()))


@pytest.mark.timeout(150)
def test_autoscaler_adds_worker_nodes_for_a_submitted_job(autoscaling_cluster):
    cluster = autoscaling_cluster
    assert cluster.worker_nodes() == [], "the cluster must start with the head alone"
    head = [n["node_id"] for n in cluster.nodes() if n["is_head_node"]]

    start = time.time()
    result = cluster.submit("python", "-c", TWO_NODE_PROBE, timeout=100)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in out, out[-3000:]

    ran_on = json.loads(re.search(r"^NODES=(\[.*\])$", out, re.M).group(1))
    assert len(ran_on) == 2, f"the two tasks shared a node: {ran_on}"
    assert not set(ran_on) & set(head), "a task ran on the 0-CPU head"
    workers = {n["node_id"] for n in cluster.worker_nodes(alive_only=False)}
    assert set(ran_on) <= workers, (ran_on, workers)
    assert added_nodes(cluster) >= 2, cluster.monitor_log()[-3000:]
    # Jobs can see how far the cluster may grow (what Ray Train and our job size against).
    assert json.loads(re.search(r"^MAX=(\{.*\})$", out, re.M).group(1)) == {"CPU": 2}
    print(f"2 worker nodes added and used in {time.time() - start:.1f}s")
