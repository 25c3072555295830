"""Keep freed memory in the process: glibc malloc settings for a decode loop.

A decode step allocates and frees the same few large tensors every step: the logits, the
sampler's buffers, and a new KV cache buffer after every merge or trim (serving/engine/gpt2_step.py).
glibc gives such blocks to the system when they are freed (mmap'd blocks, and the top of a
heap past the trim threshold) and the next step faults every page of them in again, zeroed
by the kernel. Its thresholds adapt, but not to a batch whose rows join and leave at any
step (every size differs), so sampled runs, whose rows end at eos at any step, fault far
more than greedy ones; with these settings both fault little
(tests/unit/deployment/test_allocator.py counts them).

The cost: memory the loop has used stays with the process (up to TRIM_THRESHOLD above what
it holds), which is what a long-running server wants anyway: the next batch reuses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap (fixed: no adaptive threshold)
TRIM_THRESHOLD = 512 << 20  # the heap keeps up to this much free memory before giving any back


def keep_freed_memory() -> bool:
    """Apply the settings to this process; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # macOS, musl: nothing to tune here
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the decode loop's malloc settings; freed memory goes back to the system")
    return ok
