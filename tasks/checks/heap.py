"""The C heap held steady while a job times: PyTorch's speed on CPU must not depend on glibc's mood.

glibc's malloc serves a block above its mmap threshold (128 KiB at start) with a fresh `mmap` and gives it back
to the kernel when freed; blocks below it come from heaps that are trimmed back to the kernel when their free
top grows past the trim threshold. Eager PyTorch and TorchScript allocate and free every intermediate tensor of
every call, so on a CNN at batch 8 each call page-faults its activations in again. glibc raises its thresholds
by itself after it has freed such blocks, but when it does so depends on the process's history: measured on 2
cores (docs/benchmarks.md), the same ResNet-style CNN ran eagerly at 31-37 ms in one process and 16-21 ms in
another or a few seconds later, and at 16.4-16.7 ms in every process once the thresholds were fixed. onnxruntime
keeps its own arena and does not move. A speedup over the source then depended on which state the source's
allocator was in (1.5x or 3x for the same artifact), and two comparisons in one job saw different sources.

So while a job times (the source's measurement, each paired comparison) the thresholds are fixed high, as a
serving process that has warmed up (or runs jemalloc/tcmalloc, as PyTorch's CPU tuning guide advises) has
them; afterwards they are set where glibc's own adjustment would end, and the retained memory is trimmed.
Elsewhere than glibc this does nothing, and says so (`state()`, in the report's environment).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

#: mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: while timing: blocks up to this size come from the heap (glibc accepts up to its HEAP_MAX_SIZE / 2 on 64-bit
#: builds of this age; an older one refuses, and the next value is tried)
MMAP_THRESHOLDS = (256 << 20, 32 << 20)
TRIM_THRESHOLD = 1 << 30
#: afterwards: where glibc's own adjustment ends (its largest dynamic mmap threshold, 32 MiB on 64-bit, and twice
#: that to trim), not its starting values: set explicitly they would stop the adjustment for good, and the source
#: ran 2.5x slower for the rest of the process (42-53 ms on the CNN above)
AFTER_MMAP_THRESHOLD = 32 << 20
AFTER_TRIM_THRESHOLD = 64 << 20

_lock = threading.Lock()
_depth = 0
_applied: int | None = None  # the mmap threshold in force while timing, None when not held


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where malloc is another (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def _hold(libc: ctypes.CDLL) -> int | None:
    for threshold in MMAP_THRESHOLDS:
        if libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1:
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            return threshold
    return None


def _release(libc: ctypes.CDLL) -> None:
    libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
    libc.malloc_trim(0)


@contextmanager
def steady() -> Iterator[None]:
    """Hold the heap's thresholds high for the block (re-entrant: the outermost block sets them and lets go)."""
    global _depth, _applied
    libc = _libc()
    with _lock:
        _depth += 1
        if _depth == 1 and libc is not None:
            _applied = _hold(libc)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and libc is not None and _applied is not None:
                _release(libc)
                _applied = None


def state() -> str:
    """What timing does to the heap here, for the report's environment."""
    libc = _libc()
    if libc is None:
        return "not glibc: the allocator is left as it is"
    version = libc.gnu_get_libc_version().decode()
    return (f"glibc {version}: mmap and trim thresholds fixed while timing (mmap {MMAP_THRESHOLDS[0] >> 20} MiB, "
            f"or {MMAP_THRESHOLDS[1] >> 20} MiB where refused; trim {TRIM_THRESHOLD >> 30} GiB), "
            f"{AFTER_MMAP_THRESHOLD >> 20} MiB and {AFTER_TRIM_THRESHOLD >> 20} MiB after")
