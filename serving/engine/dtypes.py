"""Which number format a replica's engine computes in, and whether vLLM's CPU build can run
here: pure functions of what the hardware says (tested as functions: CI has no GPU).

`auto`: bfloat16 where the hardware does it natively (a GPU of compute capability 8.0+,
Ampere and later; a CPU with avx512_bf16 or amx_bf16), float16 on older GPUs, float32 on
other CPUs (emulated bf16 there is slower than fp32). The checkpoint is fp32 either way;
the conversion happens at load, no conversion step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal, Optional

from training.train.cpu_features import bf16_native, read_cpuinfo

DType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(requested: str, device: str, *, compute_capability: Optional[tuple[int, int]] = None,
                  cpu_flags: Iterable[str] = ()) -> str:
    """The dtype to load the model in. `device` is "cuda" or "cpu"; `compute_capability` the
    GPU's (major, minor); `cpu_flags` /proc/cpuinfo's flags. ValueError for a dtype not in DTYPES."""
    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r}: must be one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bfloat16" if compute_capability is not None and compute_capability >= (8, 0) else "float16"
    return "bfloat16" if bf16_native(cpu_flags) else "float32"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (training/train/cpu_features.py reads them for both stages)."""
    return set(read_cpuinfo(str(cpuinfo))["flags"])


def vllm_cpu_problem(flags: Iterable[str]) -> Optional[str]:
    """One line saying why vLLM's x86 CPU build cannot run on a CPU with these flags, or None.
    vLLM's CPU backend needs AVX2 at least (AVX-512 for its full kernels: without it vLLM says
    'avx2, limited features' and still runs)."""
    flags = set(flags)
    if not flags:
        return None  # not Linux x86 /proc/cpuinfo: let vLLM decide
    if "avx2" not in flags and not flags & {"asimd", "neon"}:
        return "vLLM's CPU backend needs AVX2 (this CPU has neither AVX2 nor AVX-512); use --engine native"
    return None
