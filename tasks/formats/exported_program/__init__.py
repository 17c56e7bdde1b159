"""ExportedProgram (.pt2): the source program as saved, torch.export of the module, or TorchScript -> ExportedProgram.

With dynamic dims requested, a saved program is exported again from its module with those dims. Recipe in `export`;
localisation compares the artifact's fx graph with the source's (`portq.tasks.checks.divergence`). Variants:
`fp16` and `bf16` (exported under torch.autocast, float32 weights and I/O).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from portq.tasks.checks import runtimes
from portq.tasks.core.contract import Format
from portq.tasks.formats.base import FORMATS, FormatHandler, Route, Variant
from portq.tasks.formats.exported_program import export
from portq.tasks.formats.hardware import half_auto_skip
from portq.tasks.formats.rewrites import SCRIPT_REWRITES
from pydantic import BaseModel, ConfigDict, Field

FILENAME = "model.pt2"


class HalfPrecisionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    autocast: Literal["fp16", "bf16"] | None = Field(
        None, description="export under torch.autocast in this precision (matmuls and convolutions in half "
                          "precision; weights, inputs and outputs stay float32)")


@dataclass(frozen=True)
class AutocastConfig:
    """An export under torch.autocast in `autocast` (the format option it fixes; `export.autocast_program`)."""

    autocast: Literal["fp16", "bf16"] = "fp16"
    version: ClassVar[int] = 1


def half_precision_variants(handler: FormatHandler, what: str) -> None:
    """Register `fp16` and `bf16` on an ExportedProgram-based format: export settings, tried by `--optimize auto`
    where the lossy precision is allowed, on CUDA and on CPUs with native half arithmetic."""
    for precision in ("fp16", "bf16"):
        handler.variants.add(precision, Variant(
            precision, f"{what} exported under torch.autocast({precision}): matmuls and convolutions in {precision}, "
            "float32 weights and I/O", AutocastConfig(autocast=precision), precision=precision,
            candidate_for=frozenset({"cpu", "cuda"}), auto_skip=half_auto_skip(precision, what)))


def _localise(source: Any, path: Path, runner: Any, ev: Any, parity: Any, tol: Any) -> tuple[Any, str]:
    from portq.tasks.checks.divergence import localise_pt2
    from portq.tasks.formats.localise import source_program

    return localise_pt2(lambda: source_program(source, ev), path, ev, parity, tol)


PT2 = FormatHandler(
    format=Format.pt2,
    filename=FILENAME,
    routes=[Route("export", export.pt2_export, SCRIPT_REWRITES)],
    opener=runtimes.open_pt2,
    options=HalfPrecisionOptions,
    localise=_localise,
)
FORMATS.add(Format.pt2.value, PT2)
half_precision_variants(PT2, "the ExportedProgram")
