"""The process's memory allocator: let freed tensor memory serve the next tensor (glibc on Linux).

torch's CPU tensors come straight from malloc. glibc serves a block of 128 KB or more with its own mmap and unmaps
it on free (the threshold rises only as such blocks are freed), and it hands the top of its heap back to the
kernel once 128 KB of it is free. So a forward pass, which allocates and frees megabytes of activations in every
layer, starts each on fresh pages, and the first write to every 4 KB page faults into the kernel, which zeroes it.
`reuse_freed_memory` serves blocks up to 32 MB from the heap and never trims it.

Kept apart from `runtime` so that the CLI can set it before anything imports torch.
"""

from __future__ import annotations

import ctypes
import functools
import sys

# glibc's mallopt parameters (malloc.h), and the largest mmap threshold it accepts on a 64-bit machine
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 1024**2


@functools.cache
def reuse_freed_memory() -> bool:
    """Serve blocks up to 32 MB from the heap and never trim it; True if glibc took both settings.

    Generating for 64 DialogSum dialogues on a 2-core Intel Xeon ran 0.373 against 0.389 s per dialogue with it,
    best of six runs a side (`research/allocator_levers.py`, bench/RESULTS.md). The price: the process keeps its
    peak heap until it exits. `peftlab`'s CLI sets it as it starts (`cli.main`); a script of your own can call it
    first thing. Elsewhere than glibc (macOS, musl) it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; -1 as the trim threshold turns trimming off
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
