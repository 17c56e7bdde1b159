"""AOTInductor: an ExportedProgram compiled ahead of time for the target device (a .pt2 package).

Needs a C++ compiler on the worker (and CUDA for a cuda target); where one is missing the format is
skipped with that reason rather than failing the job's other formats.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from portq.tasks.checks.runners import TorchRunner
from portq.tasks.core.contract import Format, Target
from portq.tasks.formats import recipes
from portq.tasks.formats.base import FORMATS, FormatHandler, Route

FILENAME = "model.aoti.pt2"


class AotiModule:
    def __init__(self, path: Path, device: str):
        import torch

        self.loaded: Any = torch._inductor.aoti_load_package(str(path))

    def __call__(self, *args: Any) -> Any:
        return self.loaded(*args)


def open_runner(path: Path, device: str) -> TorchRunner:
    return TorchRunner(AotiModule(path, device), device, move=False)


def _unsupported(target: Target) -> str | None:
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "AOTInductor needs a C++ compiler (c++/g++) on the worker, and none is on PATH"
    return None


FORMATS.add(
    Format.aoti.value,
    FormatHandler(
        format=Format.aoti,
        filename=FILENAME,
        routes=[Route("inductor", recipes.aoti_inductor)],
        open_runner=open_runner,
        unsupported=_unsupported,
    ),
)
