"""``training.malloc``: how glibc's malloc serves a training process's big blocks.

glibc's malloc (the C library of the testbed's Linux hosts and images) serves a block
over its threshold (128 KiB at first, then the largest block freed so far, up to 32 MiB)
with fresh pages from mmap() and hands freed memory back to the system at once, or when
more than twice that threshold lies free at the heap's top. A training step's tensors and
frames (VGG-5: activations and gradients of 1.6 MB, convolution buffers of 6.5 MB, the TLS
pieces of 1 MiB) then either fault their pages in again step after step (a step's time
then swings with where the blocks fell: BENCHMARKS.md, section 3), or, once the threshold
has risen, land on the heap, where the blocks that live
longer between them keep the freed ones from going back: memory the process keeps but
does not use (BENCHMARKS.md, "Memory": most of what a VGG-5 device adds above torch).

The modes:

- "tuned": every block up to glibc's limit from the heap, up to ``MALLOC_KEEP`` freed
  and kept at its top: no page faulted in anew, the most memory kept;
- "lean": blocks from ``LEAN_MMAP`` bytes up from mmap(), given back when freed, and at
  most ``LEAN_MMAP`` kept at the heap's top: the least memory, a step's big blocks
  faulted in every step;
- "system": glibc as it is (its threshold moves with what is freed);
- "auto" (the default): "lean" on a host with less than ``SMALL_HOST`` of memory (a
  Raspberry Pi 3 has 1 GiB for everything), "tuned" elsewhere.

Results never depend on it (only where blocks lie), only time and memory.
"""

from __future__ import annotations

import ctypes
import os

MODES = ("auto", "tuned", "lean", "system")
MALLOC_KEEP = 64 << 20
# glibc's own starting threshold: above a step's small blocks (a Python object, a VGG-5
# batch's labels), below its tensors, down to the fused blocks' slices and window places
# (common.nets.fused): they go back when freed instead of leaving holes in the heap whose
# pages the process keeps between steps (BENCHMARKS.md, "Memory").
LEAN_MMAP = 128 << 10
SMALL_HOST = 2 << 30
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def resolve(mode: str) -> str:
    """``mode`` with "auto" decided for this host."""
    if mode != "auto":
        return mode
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return "tuned"
    return "lean" if memory < SMALL_HOST else "tuned"


def tune_malloc(mode: str = "auto") -> bool:
    """Set ``training.malloc`` for this process (before its threads start: the settings
    are the process's). True if a setting took; False for "system" or a C library without
    glibc's ``mallopt`` (musl, macOS), which are left as they are."""
    mode = resolve(mode)
    if mode == "tuned":
        mmap_from = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's DEFAULT_MMAP_THRESHOLD_MAX
        keep = MALLOC_KEEP
    elif mode == "lean":
        mmap_from = keep = LEAN_MMAP
    else:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # setting either threshold also stops glibc from moving them with what is freed
    return mallopt(M_MMAP_THRESHOLD, mmap_from) == 1 and mallopt(M_TRIM_THRESHOLD, keep) == 1
