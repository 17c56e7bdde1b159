"""ExportedProgram (.pt2): the source program as saved, torch.export of the module, or TorchScript -> ExportedProgram.

With dynamic dims requested, a saved program is exported again from its module with those dims.
"""

from __future__ import annotations

from pathlib import Path

from portq.tasks.checks.runners import TorchRunner
from portq.tasks.core.contract import Format
from portq.tasks.formats import recipes
from portq.tasks.formats.base import FORMATS, FormatHandler, Route

FILENAME = "model.pt2"


def open_runner(path: Path, device: str) -> TorchRunner:
    import torch

    return TorchRunner(torch.export.load(str(path)).module(), device)


FORMATS.add(
    Format.pt2.value,
    FormatHandler(
        format=Format.pt2,
        filename=FILENAME,
        routes=[Route("export", recipes.pt2_export)],
        open_runner=open_runner,
    ),
)
