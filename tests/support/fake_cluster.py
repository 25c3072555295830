"""A local *autoscaling* Ray cluster for tests, built on Ray's fake multi-node provider.

`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=FILE` runs the real autoscaler
(the v1 monitor that `ray up` clusters run); when demand appears it "launches" worker
nodes of the types in FILE, each an extra raylet on this machine. The head has 0 CPUs,
so any task that needs a CPU proves that the autoscaler added a node.

The config comes from the project's own `configs/cluster/fake-local.yaml`: the 2.60
wheel lacks Ray's template (`fake_multi_node/example.yaml`), so
`ray.cluster_utils.AutoscalingCluster` cannot be used (it also runs `ray stop`, which
would kill every other Ray on the machine).

Stopping kills only what this cluster started. Every process of it, fake worker nodes
and job drivers included, either names this cluster's unique temp dir on its command
line or inherits `RAY_AUTH_TOKEN_PATH=<temp dir>/auth_token` in its environment, so
that path is the marker used to find stragglers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml

from tests.support.ray_cluster import RAY, REPO_ROOT, LocalRayHead, free_port

FAKE_CONFIG = REPO_ROOT / "configs" / "cluster" / "fake-local.yaml"
PUBLISH = REPO_ROOT / "deploy" / "publish_cluster_config.py"
WORKER_TYPE = "ray.worker.cpu"
BLOCKING = "will now block forever"  # what `ray start --block` prints once the node is up


class ClusterStartError(RuntimeError):
    """The cluster did not come up (on an overloaded machine `ray start` can time out)."""


class FakeAutoscalingCluster(LocalRayHead):
    """A 0-CPU head whose autoscaler adds 1-CPU fake worker nodes on demand."""

    def __init__(self, max_workers: int = 2, worker_cpus: int = 1,
                 idle_timeout_minutes: Optional[float] = None, env: Optional[dict[str, str]] = None,
                 publish_config: bool = True, min_workers: int = 0):
        self.created_at = time.time()  # for callers' deadlines
        # The autoscaler polls every second instead of every 5: nodes come sooner.
        super().__init__(num_cpus=0, env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                                          **(env or {})})
        cfg = yaml.safe_load(FAKE_CONFIG.read_text())
        # Fake nodes join the GCS at provider.gcs_address (default: port 6379, which
        # another cluster may own): point them at this head's free port.
        cfg["provider"]["gcs_address"] = self.address
        worker = cfg["available_node_types"][WORKER_TYPE]
        worker["resources"] = {"CPU": worker_cpus}
        worker["max_workers"] = max_workers
        worker["min_workers"] = min_workers  # kept up by the autoscaler: a lost node is replaced
        cfg["max_workers"] = max_workers
        if idle_timeout_minutes is not None:
            cfg["idle_timeout_minutes"] = idle_timeout_minutes
        self.config = cfg
        self.publish_config = publish_config
        self.config_path = Path(self.temp_dir) / "autoscaling.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        # The head's dashboard agent listens on 52365 unless told otherwise; when another
        # head on this machine holds it, every job submit fails with "No available agent".
        self.extra_args = [f"--autoscaling-config={self.config_path}",
                           f"--dashboard-agent-listen-port={free_port()}"]

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> "FakeAutoscalingCluster":
        deadline = time.time() + timeout
        super().start(timeout=timeout)
        # The job API can answer before `ray start` has finished (its raylet still
        # registering; on an overloaded machine that can time out and take the head
        # down), and before the autoscaler runs. Up means: `ray start` reached its
        # blocking loop and the autoscaler reported.
        while time.time() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                break
            if BLOCKING in self.log.read_text(errors="replace") and "Monitor: Started" in self.monitor_log():
                self._publish()
                return self
            time.sleep(0.5)
        log = self.log.read_text(errors="replace")[-3000:] + self.monitor_log()[-2000:]
        self.stop()
        raise ClusterStartError(f"fake autoscaling cluster did not come up:\n{log}")

    def _publish(self) -> None:
        if not self.publish_config:
            return
        # What raycluster.yaml's head runs after `ray start`: jobs learn the ceiling.
        try:
            r = subprocess.run([sys.executable, str(PUBLISH), str(self.config_path), "--address", self.address],
                               capture_output=True, text=True, env=self.env, timeout=120)
        except subprocess.TimeoutExpired:
            self.stop()
            raise ClusterStartError("publish_cluster_config did not finish in 120 s") from None
        if r.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:]
            self.stop()
            raise ClusterStartError(f"publish_cluster_config failed:\n{r.stdout}{r.stderr[-3000:]}\n{log}")

    def stop(self) -> None:
        super().stop()
        leftovers = self.stragglers()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while self.stragglers() and time.time() < deadline:
            time.sleep(0.2)

    def cleanup(self) -> None:
        """Stop, then delete the temp dir (logs included)."""
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def stragglers(self) -> list[int]:
        """PIDs still alive that belong to this cluster (command line or environment)."""
        marker = self.temp_dir.encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "cmdline").read_bytes() or marker in (entry / "environ").read_bytes():
                    stat = (entry / "stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are already dead
                        found.append(int(entry.name))
            except (OSError, IndexError):
                continue  # gone meanwhile, or not ours to read
        return found

    def submit(self, *entrypoint: str, timeout: float = 600, working_dir: str = f"local://{REPO_ROOT}") -> subprocess.CompletedProcess:
        """As LocalRayHead.submit, but waits for the head's job agent first.

        The working dir is the checkout itself, in place (`local://`), as on a cluster whose
        nodes mount the code at one path (raycluster.yaml's /shared). An uploaded package
        does not work on a fake cluster: its nodes share one session folder, and each node's
        runtime-env agent deletes and re-extracts the package there when the node first uses
        it (Ray's working_dir plugin unpacks with overwrite=True), pulling the folder from
        under the driver and the workers already running in it (seen: a worker's `import
        torch` failing in getcwd()).

        The job API answers before the head's dashboard agent has registered; a submit in
        that window fails with 'No available agent to submit job' (seen on a loaded
        2-core machine). Retrying is what a user would do, so it is what this does.
        """
        deadline = time.time() + timeout
        while True:
            result = super().submit(*entrypoint, timeout=max(1.0, deadline - time.time()),
                                    working_dir=working_dir)
            if "No available agent" not in result.stdout + result.stderr or time.time() > deadline - 5:
                return result
            time.sleep(2)

    def kill_node(self, node_id: str) -> list[int]:
        """SIGKILL every process of one fake worker node (its raylet, agents and workers), as a
        machine that vanishes: nothing shuts down cleanly. The fake provider starts each node
        with RAY_OVERRIDE_NODE_ID_FOR_TESTING=<node id>, which its processes inherit."""
        marker = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode()
        killed = []
        for pid in self.stragglers():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in env:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        return killed

    def add_node(self, cpus: int = 1) -> subprocess.Popen:
        """Join one more 1-CPU worker node, as a replacement machine would. Ray's fake provider
        never notices that a node it launched was killed (the autoscaler keeps it as a
        pending node), so it never replaces one: the test does. The node carries this
        cluster's token path in its environment, so stop() finds and ends it."""
        log = Path(self.temp_dir) / f"added_node_{time.time():.0f}.log"
        return subprocess.Popen([RAY, "start", f"--address={self.address}", f"--num-cpus={cpus}", "--block",
                                 "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                                stdout=log.open("w"), stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    # ---- looking at the cluster -----------------------------------------------------------

    def api(self, path: str) -> Any:
        """GET a dashboard API path (with this head's token) and return the JSON."""
        req = urllib.request.Request(f"{self.dashboard_url}{path}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def nodes(self) -> list[dict]:
        """Every node the GCS knows, alive or dead (state API)."""
        return self.api("/api/v0/nodes?limit=1000&detail=1")["data"]["result"]["result"]

    def worker_nodes(self, alive_only: bool = True) -> list[dict]:
        return [n for n in self.nodes()
                if not n["is_head_node"] and (n["state"] == "ALIVE" or not alive_only)]

    def monitor_log(self) -> str:
        """The autoscaler's log: 'Adding N node(s) of type ...' lines show its decisions."""
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("monitor.*"))
                       if p.suffix in (".log", ".out", ".err"))

    def driver_logs(self) -> str:
        """The job drivers' logs, read from disk (works while a submit is hanging)."""
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("job-driver-*.log")))

    def __enter__(self) -> "FakeAutoscalingCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


def start_fake_cluster(attempts: int = 2, **kwargs) -> FakeAutoscalingCluster:
    """Start a FakeAutoscalingCluster, with a fresh one (new ports and temp dir) if the
    first does not come up: Ray gives a head's raylet a fixed 30 s to register, which a
    machine shared with other test runs does not always meet."""
    first_try = time.time()
    for attempt in range(attempts):
        cluster = FakeAutoscalingCluster(**kwargs)
        cluster.created_at = first_try  # callers' deadlines count the failed tries too
        try:
            return cluster.start()
        except (ClusterStartError, TimeoutError, RuntimeError):
            cluster.cleanup()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
