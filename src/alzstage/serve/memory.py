"""Give memory back to the operating system after a request, and measure what is held.

Why this is needed: a request of 64 large PNGs allocates and frees a few hundred MB of
pixel arrays. Python frees them, but glibc's allocator keeps freed pages in its arenas
for reuse, so the server's resident size only ever grows (issue 16 measured 4.3 GB still
held after four such requests). ``malloc_trim(0)`` hands every free page of every arena
back; it costs milliseconds, so the server calls it once the last request in flight
has finished, not per allocation.

Elsewhere than glibc (macOS, musl) there is no ``malloc_trim``: the call does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def release_memory() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim(0)``); True if any were."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (default: this one), from ``/proc``."""
    path = f"/proc/{pid or os.getpid()}/statm"
    with open(path) as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
