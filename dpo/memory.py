"""Process-wide CPU allocator settings for training, applied before torch allocates anything.

A training step allocates and frees the same large buffers over and over (activations, gradients, the LM
head's tiles). By default glibc hands every freed block of more than a few MB back to the kernel, and the
next allocation of it maps fresh pages: each first touch is a page fault (benchmarks/README.md has the cost).
Two settings keep that memory instead:

- `THP_MEM_ALLOC_ENABLE=1`: PyTorch's CPU allocator asks for 2 MB pages for tensors of 2 MB and more
  (512 times fewer faults; fewer TLB misses in the matmuls). PyTorch reads it once, at its first CPU tensor
  (importing torch or transformers allocates none), so a program calls `tune_cpu_allocator` at its start:
  train.py's command line does, importing train does not.
- glibc `mallopt`: blocks of up to 32 MB (glibc's maximum) come from the heap, and up to 1 GB of freed heap
  is kept for reuse instead of being returned to the kernel.

Neither changes a number; both are skipped where the platform lacks them, a value the user already set in
the environment (THP_MEM_ALLOC_ENABLE, MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) wins, and
`DPO_TUNE_ALLOCATOR=0` leaves the allocator entirely as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30


def tune_cpu_allocator() -> list[str]:
    """Apply the settings above; returns what was set (for the log). Call at a program's start, before its first
    tensor: after that PyTorch has read THP_MEM_ALLOC_ENABLE and setting it would change nothing."""
    applied: list[str] = []
    if os.environ.get("DPO_TUNE_ALLOCATOR", "1") == "0":
        return applied
    if "THP_MEM_ALLOC_ENABLE" not in os.environ:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        applied.append("THP_MEM_ALLOC_ENABLE=1")
    if not sys.platform.startswith("linux"):
        return applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return applied
    for env, option, value in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                               ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if env not in os.environ and mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1:
            applied.append(f"mallopt {env.strip('_').lower()}={value}")
    return applied
