"""Peak memory: a known allocation inside a measurement shows up in its peak, and only there."""

import gc

import numpy as np
from portq.tasks.checks.memory import MemoryProbe

MB = 1024 * 1024


def test_peak_rss_sees_a_transient_allocation():
    probe = MemoryProbe("cpu").start()
    block = np.ones(200 * MB // 8)  # 200 MB, touched, then freed before stop()
    del block
    gc.collect()
    mem = probe.stop()
    if mem.method == "VmHWM":  # the kernel's high-water mark catches the freed block
        assert mem.rss_delta_mb >= 190
    assert mem.rss_peak_mb >= mem.rss_before_mb
    assert mem.cuda_peak_mb is None


def test_each_measurement_has_its_own_peak():
    probe = MemoryProbe("cpu").start()
    block = np.ones(150 * MB // 8)
    del block
    gc.collect()
    first = probe.stop()
    second = MemoryProbe("cpu").start().stop()
    if first.method == "VmHWM":
        assert first.rss_delta_mb >= 140 and second.rss_delta_mb < 50
