"""serving/deployment/allocator.py: with its settings, a decode step's large tensors reuse the
process's memory instead of faulting fresh pages in at every step."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Tensors whose size changes every step, as the KV cache's does while it grows by a column.
STEPS = textwrap.dedent("""
    import resource, sys, torch
    from serving.deployment.allocator import keep_freed_memory
    if sys.argv[1] == "tuned":
        assert keep_freed_memory()
    def steps():
        for width in range(40, 80):
            x = torch.ones(32, 4, width, 256)  # 1.3 to 2.6 MB
            y = torch.cat([x, x[:, :, :1]], dim=2)
            del x, y
    steps()  # the first pass may fault its memory in: that is fine
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steps()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_tensors_reuse_memory_once_tuned():
    plain, tuned = faults("plain"), faults("tuned")
    assert plain > 1000  # glibc on its own: the steps fault thousands of pages in again
    assert tuned < plain / 10, (plain, tuned)

