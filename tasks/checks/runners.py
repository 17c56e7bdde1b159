"""Running models the same way for parity and latency: the source in PyTorch and each artifact in its runtime.

A `Runner` splits a call in three so that latency times only the model: `prepare` turns numpy inputs into
what the runtime eats (on the device), `run` executes (and synchronises the device), `outputs` turns the
result back into named numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from portq.tasks.core.contract import Target
from portq.tasks.core.errors import DeviceUnavailableError

NamedArrays = list[tuple[str, np.ndarray]]


class Runner(Protocol):
    device: str

    def prepare(self, sample: list[np.ndarray]) -> Any: ...

    def run(self, prepared: Any) -> Any: ...

    def outputs(self, raw: Any) -> NamedArrays: ...


def call(runner: Runner, sample: list[np.ndarray]) -> NamedArrays:
    return runner.outputs(runner.run(runner.prepare(sample)))


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


def flatten_outputs(obj: Any, prefix: str = "output") -> list[tuple[str, Any]]:
    """Nested tuples/lists/dicts of tensors -> a flat list with stable names (output.0, output.logits, ...)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        flat: list[tuple[str, Any]] = []
        for k, v in obj.items():
            flat.extend(flatten_outputs(v, f"{prefix}.{k}"))
        return flat
    if isinstance(obj, (tuple, list)):
        flat = []
        for i, v in enumerate(obj):
            flat.extend(flatten_outputs(v, f"{prefix}.{i}"))
        return flat
    if hasattr(obj, "to_tuple"):  # transformers ModelOutput
        return flatten_outputs(dict(obj.items()), prefix)
    if obj is None:
        return []
    if isinstance(obj, (int, float, bool)):
        return [(prefix, torch.tensor(obj))]
    raise TypeError(f"model returned a {type(obj).__name__}, which is not a tensor or a tuple/list/dict of tensors")


def to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


def to_tensors(sample: list[np.ndarray], device: str) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in sample)


def _synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


class TorchRunner:
    """Eager PyTorch (an nn.Module, a ScriptModule, an ExportedProgram's module or an AOTI package)."""

    def __init__(self, module: Any, device: str, move: bool = True):
        self.device = device
        self.module = module.to(device) if move and hasattr(module, "to") else module
        self._sync = _synchronizer(device)

    def prepare(self, sample: list[np.ndarray]) -> tuple[Any, ...]:
        return to_tensors(sample, self.device)

    def run(self, prepared: tuple[Any, ...]) -> Any:
        import torch

        with torch.inference_mode():
            out = self.module(*prepared)
        self._sync()
        return out

    def outputs(self, raw: Any) -> NamedArrays:
        return [(name, to_numpy(t)) for name, t in flatten_outputs(raw)]
