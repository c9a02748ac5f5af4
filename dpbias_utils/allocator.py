"""The C allocator of a compute process: keep freed memory for the next step instead of giving it back.

A training step on the CPU allocates and frees the same large tensors every step (logits, their
gradient, activations: 4 MB to 32 MB at the built-in model's shape). glibc's malloc serves a block
above its mmap threshold (128 KiB at start, raised as such blocks are freed) with a fresh `mmap` and
gives it back with `munmap` when freed, and it trims the top of the heap whenever more than the trim
threshold is free there. Either way the next step's tensor lands on pages the kernel must fault in
and zero again: 11 % of a default study's CPU time was system time (`time make study`: 4 min 51 s
of 43 min), 7 s of a 45 s non-DP training node.

`tune()` sets, for this process and the children it forks,

    M_MMAP_THRESHOLD = 32 MiB   (blocks below it come from the heap; fixed, no dynamic raise)
    M_TRIM_THRESHOLD = 1 GiB    (the heap top is kept unless more than this is free)

so a process holds on to its peak heap and reuses it. Which memory a tensor gets changes nothing it
computes: the same bits (the weights of a training node compared with `cmp`); only where the time
goes changes (`benchmarks/hot_paths.py`, pair `allocator`). A process's resident memory stays at its
peak instead of shrinking between steps.

Where it applies: every notebook's stage context (`pipeline.context.context`, so a node in a fresh
process and a notebook run by hand alike), node workers before their imports (`pipeline.worker`: the
forked node children inherit it) and the base builds (`basemodel.build_builtin_base`). glibc only (`mallopt`); elsewhere, or when the user set any `MALLOC_*_` variable
(glibc's own way to set these), it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024


def tune() -> bool:
    """Set the thresholds above for this process (idempotent, microseconds); True when in force."""
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False  # the user's own glibc settings win
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or None).mallopt
    except (OSError, AttributeError):  # no C library to ask, or not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
