"""TorchScript: the source archive as is, else torch.jit.trace, else torch.jit.script; run with torch.jit.load."""

from __future__ import annotations

from pathlib import Path

from portq.tasks.contract import Format
from portq.tasks.formats.base import FORMATS, ExportRequest, ExportResult, FormatHandler, RouteNotApplicable
from portq.tasks.runners import TorchRunner

FILENAME = "model.torchscript.pt"


def _passthrough(req: ExportRequest) -> ExportResult:
    import torch

    if req.model.script is None:
        raise RouteNotApplicable("the source is not a TorchScript archive")
    path = req.out_dir / FILENAME
    torch.jit.save(req.model.script, str(path))
    return ExportResult(path=path, route="passthrough")


def _trace(req: ExportRequest) -> ExportResult:
    import torch

    if req.model.script is not None:
        raise RouteNotApplicable("the source is already TorchScript")
    path = req.out_dir / FILENAME
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(req.model.module, req.args, strict=False, check_trace=False)
    torch.jit.save(traced, str(path))
    return ExportResult(path=path, route="trace")


def _script(req: ExportRequest) -> ExportResult:
    import torch

    if req.model.script is not None or req.model.program is not None:
        raise RouteNotApplicable("only Python nn.Modules can be scripted")
    path = req.out_dir / FILENAME
    torch.jit.save(torch.jit.script(req.model.module), str(path))
    return ExportResult(path=path, route="script")


def open_runner(path: Path, device: str) -> TorchRunner:
    import torch

    return TorchRunner(torch.jit.load(str(path), map_location=device).eval(), device, move=False)


FORMATS.add(
    Format.torchscript.value,
    FormatHandler(
        format=Format.torchscript,
        filename=FILENAME,
        routes=[("passthrough", _passthrough), ("trace", _trace), ("script", _script)],
        open_runner=open_runner,
    ),
)
