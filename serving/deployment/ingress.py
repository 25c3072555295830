"""How HTTP reaches the replicas: through Serve's proxy (the default), or straight to them.

Through the proxy, every request is an actor call from the proxy process to the replica,
plus a call back for the request body, and every streamed chunk is one more Ray object; for
a small model the proxy and that plumbing can take more CPU than the model (docs/serving.md).
Ray Serve's throughput-optimised mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, Ray >= 2.55)
starts an HTTP server inside each ingress replica ("direct ingress", on ports from 30000)
that runs the same FastAPI app with no proxy or actor call in between, and keeps one proxy
on the head node, which reaches the replicas over gRPC, for clients that want one address.
In production a load balancer (Ray's HAProxy mode, a Kubernetes Service) spreads clients
over the replica ports; `replica_urls` lists them.

The mode is read by every Serve process when it starts (controller, proxy, replicas), so it
is a property of the cluster: `serving/run.py --ingress direct` sets it for the local
cluster it starts, and a cluster started with `ray start` needs it in the environment of
`ray start` on every node.
"""

from __future__ import annotations

import os
import time
from typing import Optional

# The documented switch, and one of its parts turned back: in that mode a deployment
# handle's router runs on the caller's event loop, which a plain script (the launcher, the
# benchmark, operators asking a replica for its stats) has not got.
DIRECT_INGRESS_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}
INGRESS_MODES = ("proxy", "direct")


# A stopping replica keeps serving this long so that a load balancer in front can drop it
# first (Ray's default: 30 s). With no balancer (a local cluster, clients that take the
# printed URL) it only delays every stop; in-flight requests are still waited for.
NO_BALANCER_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def use_direct_ingress() -> None:
    """Turn the mode on for a local cluster this process is about to start (before ray.init
    and before `ray.serve` is imported: Serve reads these when its modules load)."""
    os.environ.update(DIRECT_INGRESS_ENV)
    for k, v in NO_BALANCER_ENV.items():
        os.environ.setdefault(k, v)


def cluster_has_direct_ingress() -> bool:
    """Whether the cluster's workers start with the mode on (asked of a worker on a node:
    workers inherit the environment of `ray start`)."""
    import ray

    @ray.remote(num_cpus=0)
    def flag() -> Optional[str]:
        return os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED")

    return ray.get(flag.remote(), timeout=120) in ("1", "true", "True")


def replica_urls(app_name: str, bind_host: str = "0.0.0.0", timeout_s: float = 60.0) -> list[str]:
    """The HTTP addresses of the app's ingress replicas that have a direct-ingress port
    (after `serve.run` returns, all of them have). Raises RuntimeError naming the cause if
    the cluster serves through the proxy only, or TimeoutError if no replica reported a
    port in time. Replicas bind Serve's HTTP host (`bind_host`): the node's address stands
    in for a wildcard one only.

    Asks the controller for what Ray's HAProxy mode is given (`get_target_groups`): an
    internal API of the pinned Ray (2.60); tests/e2e/test_ingress.py fails if it moves."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.monotonic() + timeout_s
    while True:
        groups = ray.get(controller.get_target_groups.remote(app_name), timeout=30)
        http = [g for g in groups if g.protocol == RequestProtocol.HTTP]
        mine = [t for g in http if g.app_name == app_name for t in g.targets]
        if mine:
            return [f"http://{t.ip if bind_host in ('0.0.0.0', '::', '') else bind_host}:{t.port}" for t in mine]
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if http and all(g.app_name == "" for g in http):  # the controller lists only its proxy
        raise RuntimeError(
            "the cluster serves through Serve's proxy only: direct ingress needs "
            "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the environment of `ray start` on every node")
    raise TimeoutError(f"no replica of app {app_name!r} reported a direct-ingress port within {timeout_s:.0f}s")
