"""Keep the walk's resident memory equal to what it holds, whatever the number of layers.

Measured (bench/RESULTS.md "GPTQ"): with glibc's defaults the peak RSS of a GPTQ run grew with
depth although the live data did not. Two causes, both fixed here:
- glibc's *dynamic* mmap threshold: after a freed mmapped block (a tensor of a few MB) it raises
  the threshold to that size, so the next layer's states and activations come from the heap,
  where a layer's worth of them fragments the arenas (of whichever executor thread ran the layer)
  and freed pages are not all returned. A fixed threshold (`mallopt(M_MMAP_THRESHOLD)`, which
  also turns the adjustment off) keeps every block over 256 KiB in its own mapping, given back
  when freed.
- `malloc_trim` after each layer returns the heap's free pages (the small blocks that remain).
Both are glibc calls made by hand (ctypes): no library exposes them; elsewhere they are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 256 * 2**10  # blocks at least this large get their own mapping


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def fixed_mmap_threshold() -> None:
    """Large blocks always mmapped (and unmapped when freed), for the rest of this process."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc `malloc_trim`)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
