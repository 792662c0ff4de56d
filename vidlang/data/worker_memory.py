"""DataLoader workers keep the memory they free, instead of handing it back to the OS after every clip.

A worker decodes a clip into a few MB of fresh tensors (the decoded frames, the cropped ones, the resize's
scratch), copies the result into its batch and frees them all. glibc's malloc, with its default settings,
maps large blocks on their own and gives the freed top of the heap back to the kernel once it exceeds its trim
threshold (both thresholds follow the largest mapped block freed so far), so the next clip takes the same pages
again through page faults, each one zeroed by the kernel. On the WebVid-shaped clips of ``vidlang bench
loader`` (336 px, 8 frames, random resized crop) that was 240-390 page faults per clip in the loader's workers
and up to 1,300 in a single process, where decode + crop took 21.6-21.9 ms a clip instead of 18.1-19.0; the
count moves between runs with the allocation history.

:func:`keep_freed_memory` raises the trim threshold to ``trim_mb`` and fixes the ``mmap`` threshold at
``mmap_mb``: blocks up to that size come from the heap, and up to ``trim_mb`` of freed heap stays with the
process for the next clip (page faults per clip then ~0). A worker's resident memory can therefore stay at
its own peak plus up to ``trim_mb``. Blocks larger than ``mmap_mb`` (a 1080p clip's frames) are still mapped
and unmapped one by one. :class:`~vidlang.data.shm_ring.RingDataLoader` calls it at the start of every worker
(``data.loader.keep_freed_memory``, on by default); the training process itself is left as it is.

glibc only: elsewhere (macOS, musl) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from functools import cache
from typing import Any

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MAX_MMAP_MB = 32  # glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MB on 64-bit)
_applied = False


@cache
def _mallopt() -> Any:
    """glibc's ``mallopt`` or ``None`` (not Linux, or a C library without glibc's ``gnu_get_libc_version``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: libc's (no ldconfig subprocess, as find_library runs)
        libc.gnu_get_libc_version  # noqa: B018 (musl has a mallopt that does nothing, and no such function)
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def keep_freed_memory(trim_mb: int = 64, mmap_mb: int = MAX_MMAP_MB) -> bool:
    """Let this process keep up to ``trim_mb`` of freed heap and serve blocks up to ``mmap_mb`` from the heap
    (module docstring). True when glibc accepted both settings."""
    if not 0 < mmap_mb <= MAX_MMAP_MB or trim_mb < 0:
        raise ValueError(f"keep_freed_memory: need 0 < mmap_mb <= {MAX_MMAP_MB} and trim_mb >= 0, "
                         f"got {mmap_mb}, {trim_mb}")
    global _applied
    mallopt = _mallopt()
    if mallopt is None:
        return False
    mapped = bool(mallopt(M_MMAP_THRESHOLD, mmap_mb << 20))
    trimmed = bool(mallopt(M_TRIM_THRESHOLD, trim_mb << 20))
    _applied = mapped and trimmed
    return _applied


def applied() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process."""
    return _applied


class KeepFreedMemory:
    """A ``worker_init_fn`` that calls :func:`keep_freed_memory`, then ``then`` (the loader's own, if any).
    A class rather than a closure so that it pickles for ``spawn`` workers."""

    def __init__(self, then: Callable[[int], Any] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        keep_freed_memory()
        if self.then is not None:
            self.then(worker_id)
