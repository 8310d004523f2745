"""Giving freed host memory back to the OS between the segments of a long window.

PyTorch's CPU allocator is plain malloc. glibc raises its mmap threshold as large blocks are freed, so after the
first segment a segment's activations (tens of MB each) come from the heap instead of fresh mappings; the heap
fragments and its resident size creeps up with every segment, so peak memory grew with the window (16k tokens:
1.37x the peak at 4k) though each segment needs the same. `malloc_trim(0)` between segments returns the free
pages, so the peak stays that of one segment. Elsewhere (macOS, musl) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_free_host_memory() -> None:
    """Return the heap's free pages to the OS (glibc), so the next segment starts from a compact heap."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
