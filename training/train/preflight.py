"""Ask the workers, before training, what only they can tell: their GPU and their disks.

The driver often runs on a head without GPUs, and on another machine than the workers.
So one probe task per planned worker, shaped like a worker (same CPU/GPU reservation,
spread over the nodes), reports:
- its GPU: CUDA present, bf16 native (not emulated: V100/T4 only emulate it);
- its CPU: model and flags, and whether bf16 is native there (avx512_bf16 or AMX);
- whether it sees the prepared data the driver wrote, and can write to the checkpoint
  storage and read back a token the driver wrote there.
A head-local output folder is then an error in seconds, not at the first checkpoint
upload hours in.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from training.config import ConfigError

PROBE_FILE = ".storage_probe"


def _probe(read_paths: list[str], storage: str, token: str) -> dict[str, Any]:
    import ray
    import torch

    from training.train.cpu_features import bf16_native, read_cpuinfo, speed_flags

    cpu = read_cpuinfo()
    cuda = torch.cuda.is_available()
    result: dict[str, Any] = {
        "node": ray.get_runtime_context().get_node_id(),
        "cuda": cuda,
        "bf16_native": bool(cuda and torch.cuda.is_bf16_supported(including_emulation=False)),
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_model": cpu["model"],
        "cpu_flags": speed_flags(cpu["flags"]),
        "cpu_bf16_native": bf16_native(cpu["flags"]),
        "missing": [p for p in read_paths if not os.path.exists(p)],
        "storage_ok": True,
    }
    if "://" not in storage:  # cloud URIs are reached through pyarrow's filesystems
        try:
            result["storage_ok"] = Path(storage, PROBE_FILE).read_text() == token
        except OSError:
            result["storage_ok"] = False
    return result


def probe_workers(workers: int, use_gpu: bool, cpus_per_worker: float, read_paths: list[str],
                  storage: str) -> list[dict[str, Any]]:
    """Run one probe per planned worker, shaped and spread like the workers."""
    import ray

    token = secrets.token_hex(8)
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
        Path(storage, PROBE_FILE).write_text(token)
    # Retried when its worker process dies (a node that has only just joined can lose one while
    # it sets up the job's runtime env); an exception inside the probe is not retried.
    task = ray.remote(_probe).options(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0,
                                      scheduling_strategy="SPREAD", max_retries=3)
    try:
        return ray.get([task.remote(read_paths, storage, token) for _ in range(workers)])
    finally:
        if "://" not in storage:
            Path(storage, PROBE_FILE).unlink(missing_ok=True)


def check_probes(results: list[dict[str, Any]], storage: str, output: str) -> None:
    """One ConfigError naming the flag when any worker cannot see what training needs."""
    for r in results:
        if r["missing"]:
            raise ConfigError(f"output={output!r}: a training worker (node {r['node'][:8]}) cannot see "
                              f"{r['missing'][0]}; on a multi-node cluster give --output on storage every node "
                              "mounts at the same path")
        if not r["storage_ok"]:
            raise ConfigError(f"train.storage_path={storage!r}: a training worker (node {r['node'][:8]}) cannot "
                              "read what the driver wrote there; checkpoints need storage every node shares "
                              "(a shared mount or s3://, gs://)")


def gpu_probe(results: list[dict[str, Any]]) -> dict[str, Any]:
    """What all workers have in common: bf16 (GPU or CPU) only when every worker has it natively."""
    return {"cuda": all(r["cuda"] for r in results) if results else False,
            "bf16_native": all(r["bf16_native"] for r in results) if results else False,
            "gpus": sorted({r["gpu_name"] for r in results if r.get("gpu_name")}),
            "cpu_bf16_native": all(r.get("cpu_bf16_native", False) for r in results) if results else False,
            "cpus": sorted({r["cpu_model"] for r in results if r.get("cpu_model")})}
