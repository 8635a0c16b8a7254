"""Hand freed memory back to the system promptly (glibc), for big models.

glibc serves allocations over a threshold with their own memory maps, returned to the
system on free; the threshold starts at 128 KiB and rises after each such free, up to
32 MiB, so the weight-sized buffers of the next model copy come from the heap, where a
freed one stays counted in the process's memory. A run of ``optimize`` makes and drops many
copies of the model (pass steps, sessions, checks): on a 211 MB encoder the median RSS
of a run was 2.37 GB and its peak 3.23 GB; with the threshold fixed at 1 MiB, 1.40 and
2.45 GB, at the same wall time. The command line sets it for its own process; the library
leaves an embedding program's allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD_BYTES = 1 << 20


def return_freed_memory_promptly() -> bool:
    """Fix glibc's mmap threshold at :data:`THRESHOLD_BYTES`; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1
