"""ExportedProgram (.pt2): the source program as saved, torch.export of the module, or TorchScript -> ExportedProgram.

With dynamic dims requested, a saved program is exported again from its module with those dims. Variants:
`fp16` and `bf16` (exported under torch.autocast, float32 weights and I/O).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from portq.tasks.checks import runtimes
from portq.tasks.core.contract import Format
from portq.tasks.formats import recipes
from portq.tasks.formats.base import FORMATS, SCRIPT_REWRITES, FormatHandler, Route, Variant
from portq.tasks.formats.hardware import half_auto_skip
from pydantic import BaseModel, ConfigDict, Field

FILENAME = "model.pt2"


class HalfPrecisionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    autocast: Literal["fp16", "bf16"] | None = Field(
        None, description="export under torch.autocast in this precision (matmuls and convolutions in half "
                          "precision; weights, inputs and outputs stay float32)")


def half_precision_variants(handler: FormatHandler, what: str) -> None:
    """Register `fp16` and `bf16` on an ExportedProgram-based format: export settings, tried by `--optimize auto`
    where the lossy precision is allowed, on CUDA and on CPUs with native half arithmetic."""
    for precision in ("fp16", "bf16"):
        handler.variants.add(precision, Variant(
            precision, f"{what} exported under torch.autocast({precision}): matmuls and convolutions in {precision}, "
            "float32 weights and I/O", fixed={"autocast": precision}, precision=precision,
            candidate_for=frozenset({"cpu", "cuda"}), auto_skip=half_auto_skip(precision, what)))


def _localise(source: Any, path: Path, runner: Any, ev: Any, parity: Any, tol: Any) -> tuple[Any, str]:
    from portq.tasks.checks.divergence import localise_pt2

    return localise_pt2(source, path, ev, parity, tol)


PT2 = FormatHandler(
    format=Format.pt2,
    filename=FILENAME,
    routes=[Route("export", recipes.pt2_export, SCRIPT_REWRITES)],
    opener=runtimes.open_pt2,
    options=HalfPrecisionOptions,
    localise=_localise,
)
FORMATS.add(Format.pt2.value, PT2)
half_precision_variants(PT2, "the ExportedProgram")
