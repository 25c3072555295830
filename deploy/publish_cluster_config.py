"""Tell jobs how far a `ray up` cluster can scale: publish its node types to the GCS.

Ray's v2 autoscaler (KubeRay's default) stores the cluster's node groups (resources,
min/max count) as a `ClusterConfig` record in the GCS; `ray._private.state.state.
get_max_resources_from_cluster_config()` reads it, and Ray Train (its worker-group
check), Ray Data (its autoscaling) and this project's training job (its worker-count
check) size themselves from it. The v1 autoscaler, which `ray up` clusters run, keeps its
node types to itself: a job on a fresh cluster sees a head with 0 CPUs and nothing else.

This writes the same record from a cluster launcher YAML, so a job sees the same ceiling
on both kinds of cluster. raycluster.yaml runs it on the head right after `ray start`;
tests/support/fake_cluster.py runs it on the local fake autoscaling cluster.

    python deploy/publish_cluster_config.py ~/ray_bootstrap_config.yaml [--address HOST:PORT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import yaml


def cluster_config_proto(cfg: dict[str, Any]) -> Any:
    """The autoscaler's ClusterConfig for a launcher config (node types -> node groups)."""
    from ray.core.generated import autoscaler_pb2

    head_type = cfg["head_node_type"]
    out = autoscaler_pb2.ClusterConfig()
    for name, nt in cfg["available_node_types"].items():
        group = out.node_group_configs.add()
        group.name = name
        for key, value in (nt.get("resources") or {}).items():
            group.resources[key] = int(value)
        if name == head_type:
            group.min_count, group.max_count = 1, 1
        else:
            group.min_count = int(nt.get("min_workers", 0))
            group.max_count = int(nt.get("max_workers", cfg.get("max_workers", 0)))
    return out


def max_resources(cfg: dict[str, Any]) -> dict[str, int]:
    """What the cluster can hold once every node type is at max_workers (for messages)."""
    total: dict[str, int] = {}
    for group in cluster_config_proto(cfg).node_group_configs:
        for key, value in group.resources.items():
            total[key] = total.get(key, 0) + value * group.max_count
    return total


def publish(cfg: dict[str, Any], address: Optional[str] = None) -> None:
    """Write the record where the v2 autoscaler would (the GCS KV of the cluster at `address`)."""
    import ray
    import ray._raylet
    from ray.experimental.internal_kv import _internal_kv_put

    ray.init(address=address or "auto", logging_level="ERROR", log_to_driver=False)
    try:
        _internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY,
                         cluster_config_proto(cfg).SerializeToString(), overwrite=True,
                         namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE)
    finally:
        ray.shutdown()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the cluster launcher YAML (on a ray up head: ~/ray_bootstrap_config.yaml)")
    ap.add_argument("--address", default=None, help="GCS address (default: the Ray cluster on this machine)")
    args = ap.parse_args(argv)
    path = Path(args.config).expanduser()
    try:
        cfg = yaml.safe_load(path.read_text())
        if not isinstance(cfg, dict) or "available_node_types" not in cfg or "head_node_type" not in cfg:
            raise ValueError("no available_node_types/head_node_type: not a cluster launcher config")
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    publish(cfg, args.address)
    print(f"published {path.name}: the cluster can scale to {max_resources(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
