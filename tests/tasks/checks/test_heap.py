"""The C heap held steady while timing: a large block comes from the heap inside `steady()`, from mmap outside.

Run in a fresh interpreter each time: glibc's thresholds move with the process's history, so only a new
process has known ones. `mallinfo2().hblkhd` is the bytes glibc holds in mmap'ed blocks.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from portq.tasks.checks import heap

pytestmark = pytest.mark.skipif(heap._libc() is None or not hasattr(heap._libc(), "mallinfo2"),
                                reason="glibc 2.33 or later only (mallinfo2)")

PROBE = r"""
import ctypes, json
from portq.tasks.checks import heap

libc = heap._libc()

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mmapped(size):
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    grew = libc.mallinfo2().hblkhd - before
    libc.free(block)
    return grew >= size

seen = {"fresh 4 MiB": mmapped(4 << 20)}
with heap.steady():
    with heap.steady():
        seen["steady 64 MiB"] = mmapped(64 << 20)
    seen["steady, inner left 64 MiB"] = mmapped(64 << 20)
seen["after 64 MiB"] = mmapped(64 << 20)
seen["after 8 MiB"] = mmapped(8 << 20)
print(json.dumps(seen))
"""


def test_timing_takes_large_blocks_from_the_heap_and_lets_go_after() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {
        "fresh 4 MiB": True,  # glibc's start: anything over 128 KiB is mmap'ed, and page-faulted in on each call
        "steady 64 MiB": False,  # while timing: from the heap, kept
        "steady, inner left 64 MiB": False,  # re-entrant: the outer block still holds
        "after 64 MiB": True,  # after: back over glibc's own ceiling of 32 MiB
        "after 8 MiB": False,  # ... but not its starting 128 KiB, which slowed the source 2.5x for good
    }


def test_the_report_says_what_timing_did_to_the_heap() -> None:
    assert heap.state().startswith("glibc ") and "while timing" in heap.state()
