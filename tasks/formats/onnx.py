"""ONNX: exported by torch.onnx through a ladder of routes, run in onnxruntime on the target device.

Routes, in the order tried (recipes in `portq.tasks.formats.recipes`):
  dynamo             torch.onnx.export(dynamo=True) on the nn.Module or ExportedProgram
  dynamo_decomposed  the ExportedProgram decomposed first (fused fast-path kernels rewritten), then dynamo
  torchscript        torch.onnx.export(dynamo=False), the TorchScript-based exporter: on a ScriptModule (prepared:
                     fused fast paths and complex values rewritten, every value typed, symbolics for diff, the FFT
                     family and unfold), an nn.Module or the program's module (without dynamic sizes)
  ts2ep              a TorchScript archive (prepared) converted to an ExportedProgram (TS2EPConverter), then dynamo
  ts2ep_decomposed   the same, decomposed first
For TorchScript sources the dynamo routes do not apply, so the TorchScript-based exporter goes first.

Options (`OnnxOptions`): the opset, and onnxruntime's session settings for running the artifact.
Variants: `opset17`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from portq.tasks.checks import runtimes
from portq.tasks.checks.runtimes import META_INPUTS, OrtRuntime
from portq.tasks.core.contract import Format
from portq.tasks.core.errors import DeviceUnavailableError
from portq.tasks.formats import recipes
from portq.tasks.formats.base import (
    FORMATS,
    SCRIPT_REWRITES,
    ExportRequest,
    ExportResult,
    FormatHandler,
    Route,
    Variant,
)
from pydantic import BaseModel, ConfigDict, Field

#: Opset used when --opset is not given (every route honours it; the report records what the file holds).
DEFAULT_OPSET = recipes.DEFAULT_OPSET
FILENAME = "model.onnx"


def _finish(req: ExportRequest, path: Path, route: str) -> ExportResult:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    wanted = req.options.get("opset") or DEFAULT_OPSET
    if opset != wanted:
        # the dynamo exporter writes opset 18 and converts down with onnx's version converter, which fails on
        # some graphs with only a warning; an artifact at another opset than asked for is not the artifact
        raise RuntimeError(f"the exporter wrote opset {opset}, not the requested {wanted} (onnx's version "
                           "converter could not convert the graph)")
    _name_dynamic_dims(model, req)
    entry = model.metadata_props.add()
    entry.key, entry.value = META_INPUTS, json.dumps(req.input_names)
    # Loaded without external data, the proto keeps its references to any external tensor files.
    onnx.save(model, str(path))
    return ExportResult(path=path, route=route, opset=opset)


def _name_dynamic_dims(model: Any, req: ExportRequest) -> None:
    """Give dynamic dims the user's names (`batch`, `seq`) where the exporter made up its own (`s67`)."""
    graph_inputs = {i.name: i for i in model.graph.input}
    rename: dict[str, str] = {}
    for index, axes in req.dynamic.items():
        value = graph_inputs.get(req.input_names[index]) if index < len(req.input_names) else None
        if value is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, name in axes.items():
            if axis < len(dims) and dims[axis].dim_param:
                rename.setdefault(dims[axis].dim_param, name)
    if not rename:
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


#: onnxruntime's graph optimization levels (runtimes.ORT_LEVELS)
OrtLevel = Literal["disabled", "basic", "extended", "layout", "all"]


class OnnxOptions(BaseModel):
    """Options of an ONNX artifact: how it is exported (`opset`) and how onnxruntime runs it (runner options)."""

    model_config = ConfigDict(extra="forbid")

    opset: int = Field(DEFAULT_OPSET, ge=7, le=25, description="the ONNX opset to export to")
    graph_optimization: OrtLevel = Field(
        "all", description="onnxruntime's graph optimization level when the session opens the artifact")
    intra_op_threads: int | None = Field(None, ge=0, description="onnxruntime's intra-op threads (0/unset: its "
                                                                  "default)")


def open_checked(path: str, device: str, options: dict[str, Any]) -> OrtRuntime:
    """The onnxruntime session on the target device; never silently on the CPU for a cuda target."""
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeviceUnavailableError(
            "onnxruntime on this worker has no CUDAExecutionProvider, so the ONNX artifact cannot run on the "
            "cuda target; portq refuses to report CPU numbers as GPU numbers",
            step="session:onnx", hint="install onnxruntime-gpu on gpu workers",
        )
    runtime = runtimes.open_onnx(path, device, options)
    used = runtime.providers
    if device.startswith("cuda") and (not used or used[0] != "CUDAExecutionProvider"):
        raise DeviceUnavailableError(f"onnxruntime fell back to {used} for a cuda target", step="session:onnx")
    return runtime


def _localise(source: Any, path: Path, runner: Any, ev: Any, parity: Any, tol: Any) -> tuple[Any, str]:
    from portq.tasks.checks.divergence import localise_onnx

    return localise_onnx(source, path, runner, ev, parity, tol)


ONNX = FormatHandler(
    format=Format.onnx,
    filename=FILENAME,
    routes=[
        Route("dynamo", recipes.onnx_dynamo),
        Route("dynamo_decomposed", recipes.onnx_dynamo_decomposed),
        Route("torchscript", recipes.onnx_torchscript, SCRIPT_REWRITES),
        Route("ts2ep", recipes.onnx_ts2ep, SCRIPT_REWRITES),
        Route("ts2ep_decomposed", recipes.onnx_ts2ep_decomposed, SCRIPT_REWRITES),
    ],
    opener=runtimes.open_onnx,
    checked_open=open_checked,
    options=OnnxOptions,
    finish=_finish,
    localise=_localise,
)
FORMATS.add(Format.onnx.value, ONNX)

# Variants: each a name, and the options it fixes.
ONNX.variants.add("opset17", Variant("opset17", "ONNX at opset 17, for runtimes that do not read opset 18 yet",
                                     fixed={"opset": 17}))
