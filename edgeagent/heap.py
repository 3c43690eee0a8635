"""glibc heap settings for a daemon that runs for months.

The engine saves each session turn's KV cells (megabytes) and frees older ones. glibc's
default raises its mmap threshold after the first such buffer is freed, so later ones come
from the heap and the engine thread's arena, where freed holes are kept: RSS then climbs in
steps for the first half hour and stays up. A fixed threshold sends every large buffer to
mmap (given back to the kernel on free); trimming when the engine goes idle returns the
heap's free tail. Nothing happens on a libc without these calls (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Any, Optional

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 256 * 1024  # glibc's own ceiling for the dynamic threshold is 32 MiB
TRIM_THRESHOLD = 4 * 1024 * 1024
ARENA_MAX = 2  # the inference thread and everything else


@functools.cache
def _glibc() -> Optional[Any]:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c"))
        lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError, TypeError):
        return None
    return lib


def tune() -> bool:
    """Fix the heap thresholds (call before the model loads); False when not glibc."""
    lib = _glibc()
    if lib is None:
        return False
    ok = all(
        lib.mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_ARENA_MAX, ARENA_MAX),
        )
    )
    if not ok:
        log.debug("mallopt refused a heap setting")
    return ok


def trim() -> None:
    """Give the heap's free memory back to the kernel (a few ms; call when idle)."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)
