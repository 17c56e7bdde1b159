"""The toolchain a job ran with: versions that change results (part of the job key) and where it ran.

Reads package metadata only, so the worker's main process can compute job keys without importing torch.
"""

from __future__ import annotations

import os
import platform
import socket
from functools import lru_cache
from importlib import metadata

TOOLCHAIN_PACKAGES = ("portq", "torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu")


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Python's version and each installed package's (packages that are not installed are left out)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@lru_cache(maxsize=1)
def toolchain() -> dict[str, str]:
    return package_versions(TOOLCHAIN_PACKAGES)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
