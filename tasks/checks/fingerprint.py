"""The environment a latency number was measured in: CPU and thread settings, GPU and driver, versions.

Latency without its machine is a rumour. Every job report carries this fingerprint (`environment`), taken
on the worker right before the source model is timed. The load average is read at that moment too: a busy
machine explains an unstable measurement.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

from portq.tasks.core.toolchain import package_versions

VERSION_PACKAGES = ("portq", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "numpy")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCH_NUM_THREADS",
                    "CUDA_VISIBLE_DEVICES")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what the platform module says."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version, from /proc/driver/nvidia/version (no nvidia-smi needed)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    for token in text.split():
        parts = token.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return token
    return None


@lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    import psutil

    versions = package_versions(VERSION_PACKAGES)
    freq = psutil.cpu_freq()
    return {
        "os": platform.platform(),
        "cpu": {
            "model": cpu_model(),
            "architecture": platform.machine(),
            "logical_cores": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "max_mhz": round(freq.max, 1) if freq and freq.max else None,
        },
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "versions": versions,
    }


def _torch_part(device: str) -> dict[str, Any]:
    import torch
    from portq.tasks.checks.threads import applied

    part: dict[str, Any] = {
        "threads": {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            # the job's thread count (portq.tasks.checks.threads), or onnxruntime's default: a thread per core
            "onnxruntime_intra_op": applied() or "default",
            **{k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
        },
        "torch_cuda": torch.version.cuda,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        part["gpu"] = {
            "name": props.name,
            "index": index,
            "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 2**30, 1),
            "driver": nvidia_driver(),
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return part


def _ort_part() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        return {}
    return {"onnxruntime_providers_available": list(ort.get_available_providers())}


def environment(device: str) -> dict[str, Any]:
    """The fingerprint for a measurement on `device` (cpu or cuda): static facts plus the current load."""
    env = {"device": device, **_static(), **_torch_part(device), **_ort_part()}
    try:
        env["cpu"] = {**env["cpu"], "affinity": len(os.sched_getaffinity(0))}
    except (AttributeError, OSError):
        pass
    from portq.tasks.checks.heap import state

    env["heap"] = state()
    try:
        env["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return env
