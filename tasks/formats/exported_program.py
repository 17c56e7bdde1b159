"""ExportedProgram (.pt2): the source program as is, torch.export.export, or TorchScript -> ExportedProgram.

`exported_program(req)` is shared with AOTInductor, which compiles a program.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from portq.tasks.contract import Format
from portq.tasks.formats.base import FORMATS, ExportRequest, ExportResult, FormatHandler
from portq.tasks.runners import TorchRunner

FILENAME = "model.pt2"


def dynamic_shapes(req: ExportRequest) -> tuple[Any, ...] | None:
    """torch.export dynamic_shapes from the request's named dynamic dims (same name, same Dim)."""
    import torch

    if not req.dynamic:
        return None
    dims: dict[str, Any] = {}
    spec: list[Any] = []
    for i in range(len(req.args)):
        axes = req.dynamic.get(i) or {}
        spec.append({axis: dims.setdefault(name, torch.export.Dim.DYNAMIC) for axis, name in axes.items()} or None)
    return tuple(spec)


def exported_program(req: ExportRequest) -> tuple[Any, str]:
    """An ExportedProgram for the source, and how it was obtained."""
    import torch

    if req.model.program is not None and not req.device.startswith("cuda"):
        return req.model.program, "passthrough"
    if req.model.script is not None:
        from torch._export.converter import TS2EPConverter

        return TS2EPConverter(req.model.script, req.args).convert(), "ts2ep"
    module = req.model.module
    if req.model.program is not None:  # re-export on the target device
        module = req.model.program.module()
    return torch.export.export(module, req.args, dynamic_shapes=dynamic_shapes(req)), "export"


def _export(req: ExportRequest) -> ExportResult:
    import torch

    program, route = exported_program(req)
    path = req.out_dir / FILENAME
    torch.export.save(program, str(path))
    return ExportResult(path=path, route=route)


def open_runner(path: Path, device: str) -> TorchRunner:
    import torch

    return TorchRunner(torch.export.load(str(path)).module(), device)


FORMATS.add(
    Format.pt2.value,
    FormatHandler(
        format=Format.pt2,
        filename=FILENAME,
        routes=[("export", _export)],
        open_runner=open_runner,
    ),
)
