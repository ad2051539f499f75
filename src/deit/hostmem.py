"""Host memory for XLA:CPU: keep the block a step frees for the next step.

XLA:CPU takes a step's temporaries from glibc's malloc in one block (1.6 GB for ViT-S/16 at
batch 32). glibc serves a block that large with a fresh `mmap` and unmaps it on free, so every
step page-faults its whole working set anew: 415,000 minor faults and 0.6 s of kernel time per
step on 2 cores, and 3-5 s in a VM once the hypervisor has taken the freed pages back (after a
pause of a second or two, or another program's work). Two changes keep the block instead:
glibc takes large blocks from its heap and never trims it, and JAX runs CPU computations on the
calling (main) thread, whose arena is the one heap glibc can grow to any size; a worker
thread's arena is capped at 64 MB and would still mmap such a block. (One arena for all threads
would do it too, but its lock slows a small model's step with its loader thread by ~30%.)

JAX reads the dispatch setting when it starts its backend, so call this first (the entry
scripts do; in a notebook, in the first cell). The price: the process keeps its peak heap
instead of returning it between steps, which a training or evaluation process reaches every
step anyway, and the host no longer queues the next CPU step while one runs (the loader's
prefetch thread still works ahead). `DEIT_HOST_MALLOC=default` in the environment leaves both
as they are, to compare or where this does not pay.
"""

import ctypes
import os
import sys

import jax

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_retained = False


def retain_freed_memory() -> bool:
    """Large blocks from glibc's heap, never trimmed, and CPU computations on the calling thread;
    False where this is not Linux with glibc or DEIT_HOST_MALLOC=default is set (nothing changed)."""
    global _retained
    if not sys.platform.startswith("linux") or os.environ.get("DEIT_HOST_MALLOC") == "default":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 is SIZE_MAX as glibc reads it (the threshold is a size_t): never give the top back.
    if not all(mallopt(p, v) == 1 for p, v in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))):
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    _retained = True
    return True


def retained() -> bool:
    """Whether `retain_freed_memory` took effect in this process."""
    return _retained
