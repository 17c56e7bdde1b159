"""Peak memory of one measurement: process RSS (and CUDA memory when the device is a GPU).

On Linux the kernel keeps the process's RSS high-water mark (VmHWM in /proc/self/status) and resets it
when "5" is written to /proc/self/clear_refs, so each measurement gets its own exact peak with no sampling
thread disturbing the timings. Where that is not possible the peak is the larger of the RSS before and
after (method "sampled"), which can miss a short spike.
"""

from __future__ import annotations

import re
from pathlib import Path

from portq.tasks.core.contract import Memory

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MB = 1024 * 1024


def current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _hwm() -> int | None:
    try:
        m = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _hwm() is not None


class MemoryProbe:
    """Start before loading a model, `warm()` after its first runs, `stop()` at the end of its measurement."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.exact = False
        self.rss_before = 0
        self.cuda_free_before: int | None = None
        self.cuda_used_mb: float | None = None

    def start(self) -> MemoryProbe:
        self.exact = _reset_hwm()
        self.rss_before = current_rss()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_free_before = torch.cuda.mem_get_info()[0]
        return self

    def warm(self) -> None:
        """Device memory in use now minus before (covers runtimes torch's allocator does not see)."""
        if self.cuda and self.cuda_free_before is not None:
            import torch

            torch.cuda.synchronize()
            self.cuda_used_mb = (self.cuda_free_before - torch.cuda.mem_get_info()[0]) / MB

    def stop(self) -> Memory:
        now = current_rss()
        hwm = _hwm() if self.exact else None
        peak = max(hwm or 0, now, self.rss_before)
        cuda_peak = None
        if self.cuda:
            import torch

            cuda_peak = torch.cuda.max_memory_allocated() / MB
            if self.cuda_used_mb is None:
                self.warm()
        return Memory(rss_before_mb=self.rss_before / MB, rss_peak_mb=peak / MB,
                      rss_delta_mb=(peak - self.rss_before) / MB, method="VmHWM" if hwm else "sampled",
                      cuda_peak_mb=cuda_peak, cuda_used_mb=self.cuda_used_mb)
