"""Models that misbehave for real: they crash their process, hang, eat memory, or carry a pickle payload.

Each is a small `nn.Module` saved as a state dict, loaded by portq with `--arch tests.hostile:NAME`, so
the code runs in whichever process loads it (a worker, or an isolated step's child). The misbehaviour
is switched on by what the process is doing: `torch.compiler.is_compiling()` is true while
`torch.export` (and so the ONNX dynamo exporter and AOTInductor) traces the model, and
`torch.jit.is_tracing()` while TorchScript traces it. Plain forward calls (the source model's reference
run) behave, unless the class says otherwise.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ARCH = "tests.hostile"


def _exporting() -> bool:
    return bool(torch.compiler.is_compiling())


def segfault() -> None:
    """Dereference NULL in native code: the process dies with SIGSEGV, no Python exception."""
    ctypes.string_at(0)


class _Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class CrashOnExport(_Base):
    """Segfaults while torch.export traces it (onnx, pt2, aoti); TorchScript tracing works."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting():
            segfault()
        return self.linear(x)


class HangOnExport(_Base):
    """Never returns while torch.export traces it; TorchScript tracing works."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting():
            while True:
                time.sleep(0.05)
        return self.linear(x)


class HogOnExport(_Base):
    """Takes memory in 64 MiB steps, up to 8 GiB, while torch.export traces it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting():
            hoard = []
            for _ in range(128):
                hoard.append(np.ones(8 * 2**20))  # 64 MiB, touched
                time.sleep(0.02)
        return self.linear(x)


class SlowExport(_Base):
    """Takes `seconds` while torch.export traces it (a conversion that is still running when we strike)."""

    def __init__(self, seconds: float = 3) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting():
            time.sleep(self.seconds)
        return self.linear(x)


class Sleeper(_Base):
    """Every forward call sleeps: the source model's own run outlasts any short job time limit."""

    def __init__(self, seconds: float = 3600) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.linear(x)


class CrashUnless(_Base):
    """Segfaults on every forward call until the file `marker` exists (then it is an ordinary model)."""

    def __init__(self, marker: str = "") -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not os.path.exists(self.marker):
            segfault()
        return self.linear(x)


class PidRecorder(_Base):
    """Appends its process's pid to the file `record` on every forward call, and, with `leave_thread`, leaves a
    thread running in a process that converts it (an isolated step's process is then not reused)."""

    def __init__(self, record: str = "", leave_thread: bool = False) -> None:
        super().__init__()
        self.record = record
        self.leave_thread = leave_thread

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with open(self.record, "a") as f:
            f.write(f"{os.getpid()}\n")
        if self.leave_thread and (_exporting() or torch.jit.is_tracing()):
            import threading

            threading.Thread(target=time.sleep, args=(3600,), name="left-by-a-step", daemon=True).start()
        return self.linear(x)


def write_state_dict(path: Path, seed: int = 0) -> Path:
    """The weights every class above loads, and a sidecar sample for its one input."""
    torch.manual_seed(seed)
    torch.save(_Base().state_dict(), path)
    np.savez(path.with_suffix(".npz"), x=np.random.default_rng(seed).standard_normal((2, 8)).astype(np.float32))
    return path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def write_malicious_pickle(path: Path, marker: Path) -> Path:
    """A torch.save file whose unpickling runs `touch marker`."""
    torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, path)
    return path


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def write_pickled_module(path: Path) -> Path:
    """A whole module saved with torch.save(model): loading it needs full unpickling (--trust-pickle)."""
    torch.save(Doubler(), path)
    np.savez(path.with_suffix(".npz"), x=np.ones((2, 3), dtype=np.float32))
    return path
