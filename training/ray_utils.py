"""Joining or starting Ray with a CPU budget that lets every stage run.

On a 2-core machine with `num_cpus=2`, a tokenizer actor pool of 2 x 1 CPU left Ray
Data's read tasks no CPU and the stream stalled forever (docs/training.md, "CPU budgeting"). Logical CPUs are
reservations, not cores, so a local cluster declares more of them than there are cores:
two training workers, the tokenizer actors and the read tasks all fit, and the OS
shares the real cores between them.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import ray

LOCAL_CPU_FACTOR = 2  # logical CPUs per physical core on a local cluster
MIN_LOCAL_CPUS = 4


def local_cpu_budget() -> int:
    return max(MIN_LOCAL_CPUS, (os.cpu_count() or 1) * LOCAL_CPU_FACTOR)


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, **kwargs: Any) -> dict:
    """Join a running cluster (RAY_ADDRESS, `ray job submit`, or `address`), else start one.

    Returns the cluster's resources. Idempotent: a second call returns the same.
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs.setdefault("log_to_driver", True)
    kwargs.setdefault("configure_logging", True)
    from training import log_noise

    kwargs.setdefault("logging_level", "INFO" if log_noise.verbose() else "WARNING")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Workers must import this project. A local cluster's raylet and workers inherit
        # this process's environment, so the repo root goes on PYTHONPATH here rather than
        # in a runtime_env: a job-level runtime_env makes Ray start every worker afresh
        # (the prestarted ones don't match it), seconds per worker on 2 cores.
        repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.environ.get("PYTHONPATH", "")
        if repo_root not in path.split(os.pathsep):
            os.environ["PYTHONPATH"] = repo_root + (os.pathsep + path if path else "")
        # The dashboard hosts the State API. Ray Train's PlacementGroupCleaner asks it every
        # second whether the controller lives (to free the workers' placement group if the
        # driver dies); without it every query failed and logged a warning.
        kwargs.setdefault("include_dashboard", True)
        ray.init(num_cpus=num_cpus or local_cpu_budget(), **kwargs)
    return ray.cluster_resources()
