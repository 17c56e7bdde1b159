"""What this worker's CPU can do natively (Linux: /proc/cpuinfo flags), for variants that are only worth
trying on some hardware."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_fp16() -> bool:
    """Half-precision arithmetic in hardware: x86 AVX-512 FP16, or Arm's fp16 vector extension (asimdhp)."""
    return bool(cpu_flags() & {"avx512_fp16", "asimdhp"})
