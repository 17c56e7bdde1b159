"""TorchScript: the source archive as is, else torch.jit.trace, else torch.jit.script; run with torch.jit.load."""

from __future__ import annotations

from portq.tasks.checks import runtimes
from portq.tasks.core.contract import Format
from portq.tasks.formats import recipes
from portq.tasks.formats.base import FORMATS, FormatHandler, Route

FILENAME = "model.torchscript.pt"


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
        opener=runtimes.open_torchscript,
    ),
)
