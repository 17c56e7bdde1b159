"""ExportedProgram (.pt2): the source program as saved, torch.export of the module, or TorchScript -> ExportedProgram.

With dynamic dims requested, a saved program is exported again from its module with those dims.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from portq.tasks.checks import runtimes
from portq.tasks.core.contract import Format
from portq.tasks.formats import recipes
from portq.tasks.formats.base import FORMATS, SCRIPT_REWRITES, FormatHandler, Route

FILENAME = "model.pt2"


def _localise(source: Any, path: Path, runner: Any, ev: Any, parity: Any, tol: Any) -> tuple[Any, str]:
    from portq.tasks.checks.divergence import localise_pt2

    return localise_pt2(source, path, ev, parity, tol)


FORMATS.add(
    Format.pt2.value,
    FormatHandler(
        format=Format.pt2,
        filename=FILENAME,
        routes=[Route("export", recipes.pt2_export, SCRIPT_REWRITES)],
        opener=runtimes.open_pt2,
        localise=_localise,
    ),
)
