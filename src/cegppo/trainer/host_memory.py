"""Freed host memory kept for reuse, so that large CPU buffers are not page-faulted in again at every use.

glibc serves an allocation above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and unmaps it when it
is freed, so each such buffer is faulted in page by page anew. The update allocates several per micro-batch: a
135M model's vocabulary-sized float32 gradients ([49152, 576], 113 MB: the fused LM head's weight gradient and
the tied embedding's lookups), each about 45 ms of page faults against 9 ms to fill memory already mapped. With
``mmap`` off for the heap and trimming off, glibc takes large blocks from its heap and keeps them when freed, as
a GPU caching allocator keeps device memory; the cost is a resident size that stays at its peak. glibc falls
back to ``mmap`` by itself where the heap cannot grow.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4
_kept = False


def glibc_version() -> str | None:
    """The running glibc's version, or None where the C library is another (musl, macOS, Windows)."""
    try:
        version = ctypes.CDLL(None).gnu_get_libc_version
    except (AttributeError, OSError, TypeError):
        return None
    version.restype = ctypes.c_char_p
    return version().decode()


def keep_freed_host_memory(setting: bool | None = None) -> bool:
    """Apply ``trainer.keep_host_memory``: turn glibc's ``mmap`` for large allocations and its heap trimming off
    for this process (once; there is no undoing it while buffers live on the heap). ``setting`` None: where the C
    library is glibc; True: the same, with a warning where it is not; False: nothing. Returns whether it is on."""
    global _kept
    if setting is False or _kept:
        return _kept
    if glibc_version() is None:
        if setting:
            log.warning("trainer.keep_host_memory=true has no effect: the C library is not glibc")
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        raise RuntimeError("glibc's mallopt refused M_MMAP_MAX=0 or M_TRIM_THRESHOLD")
    _kept = True
    return True
