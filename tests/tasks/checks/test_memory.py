"""Peak memory: a known allocation inside a measurement shows up in its peak, and only there."""

import gc
from pathlib import Path

import numpy as np
import pytest
from portq.tasks.checks.memory import MemoryProbe

MB = 1024 * 1024

needs_hwm = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                               reason="the kernel high-water mark (Linux /proc/self/clear_refs) is not available")


def test_an_allocation_alive_at_the_end_is_in_the_peak_by_either_method():
    probe = MemoryProbe("cpu").start()
    block = np.ones(200 * MB // 8)  # 200 MB, touched and still held when the probe stops
    mem = probe.stop()
    assert mem.rss_delta_mb >= 190 and mem.rss_peak_mb >= mem.rss_before_mb + 190
    assert mem.cuda_peak_mb is None
    del block


@needs_hwm
def test_peak_rss_sees_a_transient_allocation():
    probe = MemoryProbe("cpu").start()
    block = np.ones(200 * MB // 8)  # 200 MB, touched, then freed before stop()
    del block
    gc.collect()
    mem = probe.stop()
    assert mem.method == "VmHWM"  # Linux: the kernel's high-water mark, reset per measurement
    assert mem.rss_delta_mb >= 190


@needs_hwm
def test_each_measurement_has_its_own_peak():
    probe = MemoryProbe("cpu").start()
    block = np.ones(150 * MB // 8)
    del block
    gc.collect()
    first = probe.stop()
    second = MemoryProbe("cpu").start().stop()
    assert first.method == second.method == "VmHWM"
    assert first.rss_delta_mb >= 140 and second.rss_delta_mb < 50
