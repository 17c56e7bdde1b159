"""Running models the same way for parity and latency: the source in PyTorch and each artifact in its runtime.

A `Runner` splits a call in three so that latency times only the model: `prepare` turns numpy inputs into
what the runtime eats (on the device), `run` executes (and synchronises the device), `outputs` turns the
result back into named numpy arrays. The runtimes themselves live in `portq.tasks.checks.runtimes`, which
the reproduce scripts share.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from portq.tasks.checks.runtimes import TorchRuntime as TorchRunner
from portq.tasks.checks.runtimes import call, flatten, to_numpy, to_tensors
from portq.tasks.core.contract import Target
from portq.tasks.core.errors import DeviceUnavailableError

__all__ = ["NamedArrays", "Runner", "TorchRunner", "call", "flatten", "to_numpy", "to_tensors", "torch_device"]

NamedArrays = list[tuple[str, np.ndarray]]


class Runner(Protocol):
    device: str

    def prepare(self, sample: list[np.ndarray]) -> Any: ...

    def run(self, prepared: Any) -> Any: ...

    def outputs(self, raw: Any) -> NamedArrays: ...


def torch_device(target: Target) -> str:
    """The torch device for a target; a cuda target on a machine without CUDA fails, never falls back."""
    if Target(target) is Target.cpu:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        import os

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceUnavailableError(
            "no CUDA device: this job targets cuda but torch.cuda.is_available() is False on this worker"
            + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""),
            step="device",
            hint="run gpu-queue workers on machines with an NVIDIA GPU and a CUDA build of torch; portq never "
                 "converts a cuda job on the CPU",
        )
    return "cuda"
