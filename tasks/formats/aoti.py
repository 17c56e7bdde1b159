"""AOTInductor: an ExportedProgram compiled ahead of time for the target device (a .pt2 package).

Needs a C++ compiler on the worker (and CUDA for a cuda target); where one is missing the format is
skipped with that reason rather than failing the job's other formats. Variants: `max-autotune`, and `fp16` and
`bf16` (compiled from a program exported under torch.autocast: compiling a model cast to half crashed).
"""

from __future__ import annotations

import shutil

from portq.tasks.checks import runtimes
from portq.tasks.core.contract import Format, Target
from portq.tasks.formats import recipes
from portq.tasks.formats.base import FORMATS, SCRIPT_REWRITES, FormatHandler, Route, Variant
from portq.tasks.formats.exported_program import HalfPrecisionOptions, half_precision_variants
from pydantic import ConfigDict, Field

FILENAME = "model.aoti.pt2"


def _unsupported(target: Target) -> str | None:
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "AOTInductor needs a C++ compiler (c++/g++) on the worker, and none is on PATH"
    return None


class AotiOptions(HalfPrecisionOptions):
    model_config = ConfigDict(extra="forbid")

    max_autotune: bool = Field(False, description="let inductor benchmark kernel choices while it compiles")


AOTI = FormatHandler(
    format=Format.aoti,
    filename=FILENAME,
    routes=[Route("inductor", recipes.aoti_inductor, SCRIPT_REWRITES)],
    opener=runtimes.open_aoti,
    options=AotiOptions,
    unsupported=_unsupported,
)
FORMATS.add(Format.aoti.value, AOTI)
# an export setting rather than a recipe on a file: tried by --optimize auto on cuda, by name anywhere
AOTI.variants.add("max-autotune", Variant("max-autotune", "AOTInductor with max-autotune (inductor benchmarks "
                                          "kernel choices while compiling)", fixed={"max_autotune": True},
                                          candidate_for=frozenset({"cuda"})))
half_precision_variants(AOTI, "AOTInductor")
