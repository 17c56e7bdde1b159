"""What this worker's CPU can do natively (Linux: /proc/cpuinfo flags), for variants that are only worth
trying on some hardware."""

from __future__ import annotations

from collections.abc import Callable
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


def cpu_has_native_bf16() -> bool:
    """bfloat16 arithmetic in hardware: x86 AVX-512 BF16 or AMX, or Arm's BF16 extension."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def half_auto_skip(precision: str, what: str) -> Callable[[str], str | None]:
    """`--optimize auto`'s reason to leave a half-precision variant out on this worker's CPU (None on CUDA)."""
    native = cpu_has_native_fp16 if precision == "fp16" else cpu_has_native_bf16

    def skip(target: str) -> str | None:
        if target == "cpu" and not native():
            return (f"{what} computes {precision} through conversions on this CPU (no native {precision} "
                    "arithmetic): not faster; ask for it by name to measure it anyway")
        return None

    return skip
