"""TorchScript: the source archive as is, else torch.jit.trace, else torch.jit.script; run with torch.jit.load."""

from __future__ import annotations

from pathlib import Path

from portq.tasks.checks.runners import TorchRunner
from portq.tasks.core.contract import Format
from portq.tasks.formats import recipes
from portq.tasks.formats.base import FORMATS, FormatHandler, Route

FILENAME = "model.torchscript.pt"


def open_runner(path: Path, device: str) -> TorchRunner:
    import torch

    return TorchRunner(torch.jit.load(str(path), map_location=device).eval(), device, move=False)


FORMATS.add(
    Format.torchscript.value,
    FormatHandler(
        format=Format.torchscript,
        filename=FILENAME,
        routes=[
            Route("passthrough", recipes.torchscript_passthrough),
            Route("trace", recipes.torchscript_trace),
            Route("script", recipes.torchscript_script),
        ],
        open_runner=open_runner,
    ),
)
