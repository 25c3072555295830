"""What a CPU offers this project's kernels, read from /proc/cpuinfo's flags.

bf16 matmuls are fast only where the CPU has them natively: `avx512_bf16` (AMD Zen 4, Intel
Cooper Lake and later) or AMX (`amx_bf16`, Intel Sapphire Rapids and later). Elsewhere oneDNN
runs bf16 on a slow reference path and fp32 is faster. The same code meets both kinds of
machine (an AMD EPYC without AVX-512 and Intel Xeons with AMX both occur), so the choice is a
pure function of the flags, unit tested over flag sets (tests/unit/train/test_cpu_features.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# The flags this project's speed depends on, as benchmarks/record.py prints them.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def parse_cpuinfo(text: str) -> dict[str, object]:
    """The first processor's model name and flags (Linux /proc/cpuinfo; x86 `flags`, ARM
    `Features`). Empty flags where the text has none."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    return {"model": fields.get("model name") or fields.get("Model") or "", "flags": flags}


def read_cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, object]:
    """This machine's CPU (no /proc, e.g. macOS: no flags, so no native bf16 is assumed)."""
    try:
        return parse_cpuinfo(Path(path).read_text())
    except OSError:
        return {"model": "", "flags": []}


def bf16_native(flags: Iterable[str]) -> bool:
    """True where bf16 matmuls run on native instructions (avx512_bf16 or AMX-BF16)."""
    have = set(flags)
    return any(f in have for f in BF16_FLAGS)


def speed_flags(flags: Iterable[str]) -> list[str]:
    have = set(flags)
    return [f for f in SPEED_FLAGS if f in have]


def core_for(local_rank: int, local_world: int, allowed: Iterable[int]) -> int | None:
    """The core a CPU worker's threads are pinned to: its own, when every worker on the node
    can have one (else None: leave the OS to place them). Unpinned, two 1-thread workers on 2
    cores ran their steps measurably slower than pinned ones, the OS moving them between the
    cores that Ray's own processes also use (benchmarks/RESULTS.md, train: weak scaling)."""
    cores = sorted(allowed)
    if local_world < 1 or local_world > len(cores) or not 0 <= local_rank < local_world:
        return None
    return cores[local_rank * (len(cores) // local_world)]


def pin_to_core(local_rank: int, local_world: int) -> int | None:
    """Pin this process to `core_for` its rank (Linux); returns the core, or None."""
    import os

    if not hasattr(os, "sched_setaffinity"):
        return None
    core = core_for(local_rank, local_world, os.sched_getaffinity(0))
    if core is not None:
        os.sched_setaffinity(0, {core})
    return core
