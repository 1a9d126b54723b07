# SPDX-License-Identifier: Apache-2.0
"""Giving freed heap memory back to the operating system between the phases of a rewrite.

glibc's allocator keeps the memory of freed small and medium blocks (below its mmap
threshold, which grows up to 32 MiB as large blocks are freed) for reuse, so a phase
that allocates and frees many such blocks (calibration: activations, Gram matrices)
leaves the process's resident size up by what it freed. That is not a copy of anything,
but it counts towards the peak when the next phase's large blocks come from fresh
mappings. ``malloc_trim(0)`` returns it.

Example:
    >>> release_free_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from typing import Any, Optional

__all__ = ["release_free_memory"]


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Any]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the C heap's free memory to the OS (glibc ``malloc_trim(0)``); False where there is no such call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
