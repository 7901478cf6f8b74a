"""Large freed blocks go back to the OS (glibc): the CLI's peak RSS is what it holds, not what it once held.

Why: glibc's malloc serves a block above its mmap threshold (128 KiB at start) from a mapping of its
own, unmapped when freed, and the rest from the heap, which only shrinks from its top. Each time a
mapped block is freed, glibc raises the threshold to that block's size (up to 32 MiB). After the
first per-layer weight cast is freed (:mod:`unison_runtime.vace.stored_precision`), every block
below that size comes from the heap: the sampler's text K/V (25 MB per cross-attention at 1.3B,
kept for the run) lands between short-lived cast weights, and the holes they leave stay resident.
At released size a staged 64x64 video's sampling peaked at 9.55 GiB with glibc's default and at
7.74 GiB with a fixed threshold (BENCHMARKS.md section 8). Setting the threshold with ``mallopt``
also switches that adjustment off, so every block above it keeps a mapping of its own.

The cost is page faults: a large temporary gets fresh pages each time it is allocated (most of the
per-layer casts are above 32 MiB and already do). Only the CLI's process is changed: a host such as
ComfyUI keeps its own allocator settings. A ``MALLOC_MMAP_THRESHOLD_`` in the environment (the timing
benchmarks set one) is left as the user chose it.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc's ``M_MMAP_THRESHOLD`` parameter of ``mallopt`` (malloc.h).
M_MMAP_THRESHOLD = -3
#: Blocks of at least this size get their own mapping: the text K/V (25 MB) and the cast weights
#: (9-55 MB) are far above it; the many small tensors below it reuse the heap.
MMAP_THRESHOLD = 4 * 1024 * 1024


def unmap_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; True when it was set.

    False (nothing changed) off Linux, with a C library other than glibc, or when the environment
    already sets ``MALLOC_MMAP_THRESHOLD_``.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc: its mallopt (if any) means something else
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
