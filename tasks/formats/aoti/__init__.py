"""AOTInductor: an ExportedProgram compiled ahead of time for the target device (a .pt2 package).

Needs a C++ compiler on the worker (and CUDA for a cuda target); where one is missing the format is
skipped with that reason rather than failing the job's other formats. Recipe in `export`. Variants:
`max-autotune`, and `fp16` and `bf16` (compiled from a program exported under torch.autocast: compiling a model
cast to half crashed).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import ClassVar

from portq.tasks.checks import runtimes
from portq.tasks.core.contract import Format, Target
from portq.tasks.formats.aoti import export
from portq.tasks.formats.base import FORMATS, FormatHandler, Route, Variant
from portq.tasks.formats.exported_program import HalfPrecisionOptions, half_precision_variants
from portq.tasks.formats.exported_program import export as program_export
from portq.tasks.formats.rewrites import SCRIPT_REWRITES
from pydantic import ConfigDict, Field

FILENAME = "model.aoti.pt2"


def _unsupported(target: Target) -> str | None:
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "AOTInductor needs a C++ compiler (c++/g++) on the worker, and none is on PATH"
    return None


class AotiOptions(HalfPrecisionOptions):
    model_config = ConfigDict(extra="forbid")

    max_autotune: bool = Field(False, description="let inductor benchmark kernel choices while it compiles")


@dataclass(frozen=True)
class AutotuneConfig:
    """AOTInductor's compile with inductor's max-autotune (the format option it fixes)."""

    max_autotune: bool = True
    version: ClassVar[int] = 1


AOTI = FormatHandler(
    format=Format.aoti,
    filename=FILENAME,
    routes=[Route("inductor", export.aoti_inductor, (*SCRIPT_REWRITES, program_export))],
    opener=runtimes.open_aoti,
    options=AotiOptions,
    unsupported=_unsupported,
    auto_for=frozenset({"cpu", "cuda"}),
    search_cost=10,  # a compile: most of a minute for a small model on 2 CPU cores
)
FORMATS.add(Format.aoti.value, AOTI)
# an export setting rather than a recipe on a file: tried by --optimize auto on cuda, by name anywhere
AOTI.variants.add("max-autotune", Variant("max-autotune", "AOTInductor with max-autotune (inductor benchmarks "
                                          "kernel choices while compiling)", AutotuneConfig(),
                                          candidate_for=frozenset({"cuda"})))
half_precision_variants(AOTI, "AOTInductor")
