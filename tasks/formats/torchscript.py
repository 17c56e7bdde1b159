"""TorchScript: the source archive as is, else torch.jit.trace, else torch.jit.script; run with torch.jit.load.

Variants: `frozen` (torch.jit.freeze of the default artifact, opened with optimize_for_inference).
"""

from __future__ import annotations

from portq.tasks.checks import runtimes
from portq.tasks.core.contract import Format
from portq.tasks.formats import recipes
from portq.tasks.formats.base import FORMATS, FormatHandler, Route, Variant
from pydantic import BaseModel, ConfigDict, Field

FILENAME = "model.torchscript.pt"


class TorchScriptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    optimize_for_inference: bool = Field(False, description="apply torch.jit.optimize_for_inference when the "
                                                            "artifact is opened (CPU rewrites such as MKLDNN)")


TORCHSCRIPT = FormatHandler(
    format=Format.torchscript,
    filename=FILENAME,
    routes=[
        Route("passthrough", recipes.torchscript_passthrough),
        Route("trace", recipes.torchscript_trace),
        Route("script", recipes.torchscript_script),
    ],
    opener=runtimes.open_torchscript,
    options=TorchScriptOptions,
)
FORMATS.add(Format.torchscript.value, TORCHSCRIPT)
TORCHSCRIPT.variants.add("frozen", Variant(
    "frozen", "torch.jit.freeze, opened with optimize_for_inference (Conv+BN folding, MKLDNN on CPU)",
    fixed={"optimize_for_inference": True}, base="default", transform=recipes.torchscript_frozen,
    candidate_for=frozenset({"cpu"})))
