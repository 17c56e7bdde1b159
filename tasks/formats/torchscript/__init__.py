"""TorchScript: the source archive as is, else torch.jit.trace, else torch.jit.script; run with torch.jit.load.

Recipes in `export`. Variants: `frozen` (torch.jit.freeze of the default artifact, opened with
optimize_for_inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from portq.tasks.checks import runtimes
from portq.tasks.core.contract import Format
from portq.tasks.formats.base import FORMATS, FormatHandler, Route, Variant
from portq.tasks.formats.torchscript import export
from pydantic import BaseModel, ConfigDict, Field

FILENAME = "model.torchscript.pt"


class TorchScriptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    optimize_for_inference: bool = Field(False, description="apply torch.jit.optimize_for_inference when the "
                                                            "artifact is opened (CPU rewrites such as MKLDNN)")


@dataclass(frozen=True)
class FreezeConfig:
    """torch.jit.freeze of the default artifact (`export.torchscript_frozen`), with its default settings."""

    version: ClassVar[int] = 1


TORCHSCRIPT = FormatHandler(
    format=Format.torchscript,
    filename=FILENAME,
    routes=[
        Route("passthrough", export.torchscript_passthrough),
        Route("trace", export.torchscript_trace),
        Route("script", export.torchscript_script),
    ],
    opener=runtimes.open_torchscript,
    options=TorchScriptOptions,
    auto_for=frozenset({"cpu", "cuda"}),
)
FORMATS.add(Format.torchscript.value, TORCHSCRIPT)
TORCHSCRIPT.variants.add("frozen", Variant(
    "frozen", "torch.jit.freeze, opened with optimize_for_inference (Conv+BN folding, MKLDNN on CPU)", FreezeConfig(),
    fixed={"optimize_for_inference": True}, base="default", transform=export.torchscript_frozen,
    candidate_for=frozenset({"cpu"}), headroom=3.0))
