"""Keep freed memory in the process for the next forward instead of handing it back to the kernel (glibc only).

A CPU forward of the model allocates and frees the same few tens of large activations over and over (a tiny
window's HR stage-0 tensors are 5-85 MB). glibc serves blocks above its mmap threshold (128 kB at start, raised
on the fly up to 32 MB as such blocks are freed) with fresh ``mmap`` calls and trims the heap top above 128 kB, so
each forward page-faults its activations in again. Measured on the demo cube (tiny, 2 cores, 6 tiles, three
passes in one process, twice): the bare forward costs 0.112-0.143 ms per output pixel in its first pass and
0.091-0.095 later by default, 0.082-0.092 from the first pass on with the settings below.
The cost is memory kept by the process: up to :data:`TRIM_THRESHOLD` of freed heap, i.e. about the activations of
one forward, which it needs again for the next one. PyTorch's CPU allocator has no caching of its own; jemalloc or
tcmalloc by ``LD_PRELOAD`` do the same, but need a library the machine may not have. Hand-written because no
library sets ``mallopt``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

MMAP_THRESHOLD = 32 << 20  # [ours] glibc's maximum: blocks below it come from the heap and are reused
TRIM_THRESHOLD = 512 << 20  # [ours] freed heap kept before trimming
TOP_PAD = 64 << 20  # [ours] extra heap taken per growth

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>
_done = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep and reuse freed memory (module docstring), once per process. Returns whether
    the settings took (False where the C library is not glibc)."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    return _done
