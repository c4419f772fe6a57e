"""Process-level CPU tuning (opt-in for library callers): keep freed memory instead of handing it back to the OS.

Why: the chunked kernels allocate and free the same few-MB temporaries block after block, and a long
prefill allocates a fresh output every call. glibc's malloc serves large requests with fresh ``mmap``
pages and trims freed heap tops, so every block pays page faults (a zeroed 4 KB page each): measured
here, causal Hedgehog attention at N=16384 (B=1, H=8, d=64) spent about a third of its forward time
in faults (26k per call; 170 ms -> 105 ms with the tuning). Allocators that cache (jemalloc,
tcmalloc, PyTorch's CUDA allocator) avoid this; the PyTorch CPU performance guides recommend them for
the same reason. This module gets the same effect from glibc with two ``mallopt`` settings.

The cost: memory freed by the process stays in it (up to ``trim`` bytes on top of the heap), so the
resident size stays near its peak instead of shrinking. The fused CPU kernels do not need it (they keep their
own output buffers); it helps the many large autograd temporaries of training. The ``hedgehog`` command turns
it on for training and evaluation (not for the benchmarks); set ``HEDGEHOG_MALLOC_TUNING=0`` to leave malloc
alone. Library users may call :func:`keep_freed_memory`. Nothing happens on non-glibc systems.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DEFAULT_MMAP = 512 << 20  # requests below this come from the heap and are reused
_DEFAULT_TRIM = (1 << 31) - 1  # free heap top kept before returning memory (mallopt takes an int)

_applied = None
log = logging.getLogger(__name__)


def keep_freed_memory(mmap_threshold: int = _DEFAULT_MMAP, trim_threshold: int = _DEFAULT_TRIM) -> bool:
    """Make glibc malloc reuse freed memory (see the module docstring). Returns True if applied.

    Idempotent; returns False (and changes nothing) when the C library is not glibc or
    ``HEDGEHOG_MALLOC_TUNING=0`` is set.
    """
    global _applied
    if os.environ.get("HEDGEHOG_MALLOC_TUNING", "1") == "0":
        return False
    if _applied is not None:
        return _applied
    _applied = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    if not ok:
        log.info("mallopt refused the malloc tuning; continuing with the defaults")
    _applied = ok
    return ok
