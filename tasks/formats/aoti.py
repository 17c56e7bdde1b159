"""AOTInductor: an ExportedProgram compiled ahead of time for the target device (a .pt2 package).

Needs a C++ compiler on the worker (and CUDA for a cuda target); where one is missing the format is
skipped with that reason rather than failing the job's other formats.
"""

from __future__ import annotations

import shutil

from portq.tasks.checks import runtimes
from portq.tasks.core.contract import Format, Target
from portq.tasks.formats import recipes
from portq.tasks.formats.base import FORMATS, SCRIPT_REWRITES, FormatHandler, Route

FILENAME = "model.aoti.pt2"


def _unsupported(target: Target) -> str | None:
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "AOTInductor needs a C++ compiler (c++/g++) on the worker, and none is on PATH"
    return None


FORMATS.add(
    Format.aoti.value,
    FormatHandler(
        format=Format.aoti,
        filename=FILENAME,
        routes=[Route("inductor", recipes.aoti_inductor, SCRIPT_REWRITES)],
        opener=runtimes.open_aoti,
        unsupported=_unsupported,
    ),
)
