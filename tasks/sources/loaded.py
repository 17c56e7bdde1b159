"""What every loader takes and gives: a `LoadRequest` in, a `LoadedModel` out, and the float equivalent of a
dynamically quantized model, which every loader of a whole module applies.

`loading` (kind detection and the loader registry) and `checkpoints` (torch.save and safetensors files) both
build on this module; neither imports the other back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portq.tasks.core.errors import ModelLoadError


@dataclass
class LoadedModel:
    """A source model ready to run in eager PyTorch, with what it carries about itself."""

    kind: str
    module: Any  # torch.nn.Module or ScriptModule: callable on positional tensors
    input_names: list[str] = field(default_factory=list)
    example_inputs: tuple[Any, ...] | None = None
    program: Any = None  # torch.export.ExportedProgram, for .pt2
    script: Any = None  # torch.jit.ScriptModule, for TorchScript
    onnx: str | None = None  # the file, for an ONNX source (`portq optimize`)
    input_specs: list[Any] | None = None  # InputSpecs the source builds its own inputs from (a Hugging Face config)
    notes: list[str] = field(default_factory=list)  # what loading changed (e.g. the float equivalent), for the report


@dataclass
class LoadRequest:
    path: Path
    display: str  # the user's file name, for messages
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False


def float_equivalent(model: Any, display: str) -> tuple[Any, list[str]]:
    """A dynamically quantized model's float equivalent (and the note saying so); a statically quantized one is
    refused with why and what to do."""
    from portq.tasks.sources.dequantize import DequantError
    from portq.tasks.sources.dequantize import float_equivalent as dequantized

    try:
        return dequantized(model)
    except DequantError as e:
        raise ModelLoadError(str(e), step="load", file=display) from None
