"""Keep freed activation memory in the process for the next step instead of returning it to the OS.

A training step allocates and frees the same large arrays every time (a GPT step of batch 32 x 128:
activations of 2-8 MB each). glibc serves each such array with a fresh mmap, or trims the freed top of
its heap, so every step touches new pages: 41,000 page faults a step were measured, about a tenth of
the step's time. Raising glibc's mmap threshold to its maximum (32 MB) and its trim threshold to 1 GB
makes those arrays come back from malloc's free lists: 0 page faults a step after the first. The
resident size then stays at the step's peak between steps (the peak itself is unchanged).

Applied once when `disttrain.ops` is imported, on glibc only; DISTTRAIN_KEEP_MEMORY=0 turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters in glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 1 << 30
_applied = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as described above (once per process); True if it was applied."""
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get("DISTTRAIN_KEEP_MEMORY", "1") != "0":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
