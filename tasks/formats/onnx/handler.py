"""ONNX: exported by torch.onnx through a ladder of routes, run in onnxruntime on the target device.

Routes, in the order tried (recipes in `portq.tasks.formats.onnx.export`):
  passthrough        an ONNX source file as it is (`portq optimize`); not applicable to PyTorch sources
  dynamo             torch.onnx.export(dynamo=True) on the nn.Module or ExportedProgram
  dynamo_decomposed  the ExportedProgram decomposed first (fused fast-path kernels rewritten), then dynamo
  torchscript        torch.onnx.export(dynamo=False), the TorchScript-based exporter: on a ScriptModule (prepared:
                     fused fast paths and complex values rewritten, every value typed, symbolics for diff, the FFT
                     family and unfold), an nn.Module or the program's module (without dynamic sizes)
  ts2ep              a TorchScript archive (prepared) converted to an ExportedProgram (TS2EPConverter), then dynamo
  ts2ep_decomposed   the same, decomposed first
For TorchScript sources the dynamo routes do not apply, so the TorchScript-based exporter goes first. Every route's
file is opened in onnxruntime before it counts (`_loads`): one that does not load is left, and the next route tried.

Options (`OnnxOptions`): the opset, where the weights go (`external_data`), and onnxruntime's session settings for
running the artifact. The recipes are in `export`; the variants, each with its config, in `variants`.

Weights over 1 GiB (or all of them, with `external_data: always`) are written to `model.onnx.data` beside
`model.onnx`, whichever route exported them: the two files are one artifact (its size counts both), moved,
published and opened together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from portq.tasks.checks import runtimes
from portq.tasks.checks.runtimes import META_INPUTS, OrtRuntime
from portq.tasks.core.contract import Format
from portq.tasks.core.errors import DeviceUnavailableError
from portq.tasks.formats import exporter_cache
from portq.tasks.formats.base import (
    FORMATS,
    ArtifactUnloadable,
    ExportRequest,
    ExportResult,
    FormatHandler,
    Route,
)
from portq.tasks.formats.onnx import export, symbolics
from portq.tasks.formats.onnx.export import DEFAULT_OPSET, onnx_opset
from portq.tasks.formats.rewrites import SCRIPT_REWRITES
from pydantic import BaseModel, ConfigDict, Field

FILENAME = "model.onnx"


def _finish(req: ExportRequest, path: Path, route: str) -> ExportResult:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = onnx_opset(model)
    wanted = req.options.get("opset") or DEFAULT_OPSET
    if opset != wanted and route != "passthrough":  # an ONNX source keeps its own opset
        # the dynamo exporter writes opset 18 and converts down with onnx's version converter, which fails on
        # some graphs with only a warning; an artifact at another opset than asked for is not the artifact
        raise RuntimeError(f"the exporter wrote opset {opset}, not the requested {wanted} (onnx's version "
                           "converter could not convert the graph)")
    _name_dynamic_dims(model, req)
    entry = model.metadata_props.add()
    entry.key, entry.value = META_INPUTS, json.dumps(req.input_names)
    # Loaded without external data, the proto keeps its references to its external weights (model.onnx.data).
    onnx.save(model, str(path))
    return ExportResult(path=path, route=route, opset=opset, data=external_data_files(path))


def external_data_files(path: Path) -> list[Path]:
    """The external data files the ONNX file at `path` refers to (beside it), which belong to the artifact."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    header = onnx.load(str(path), load_external_data=False)
    names = sorted({ExternalDataInfo(t).location for t in _get_all_tensors(header) if uses_external_data(t)})
    return [path.parent / n for n in names]


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


def _loads(req: ExportRequest, result: ExportResult) -> None:
    """onnxruntime opens what the route wrote, as the session step will (the artifact's optimization level; the
    target's provider where this worker has it, else the CPU's): an exporter can write a graph that passes its own
    checks and still fails onnxruntime's shape inference or optimizers (a Tile whose repeats are not a 1-D int64
    tensor), and that must cost the route, not the job."""
    import re

    import onnxruntime as ort

    cuda = req.device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
    try:
        runtimes.open_onnx(str(result.path), req.device if cuda else "cpu", req.options)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        text = " ".join(str(e).split())
        node = re.search(r"Node \(([^)]*)\) Op \(([^)]*)\)", text)
        where, what = (f" at its {node[2]} node {node[1]}", f"{node[2]} node") if node else ("", "graph")
        raise ArtifactUnloadable(
            f"onnxruntime {ort.__version__} cannot load the graph route {result.route} wrote{where}: {text[:300]}",
            step="export:onnx", file=req.display,
            hint=f"the exporter wrote an invalid {what}; a later route may write it differently, else convert to "
                 "torchscript or pt2, or compute that part of the model with other ops") from None


#: onnxruntime's graph optimization levels (runtimes.ORT_LEVELS)
OrtLevel = Literal["disabled", "basic", "extended", "layout", "all"]


class OnnxOptions(BaseModel):
    """Options of an ONNX artifact: how it is exported (`opset`) and how onnxruntime runs it (runner options)."""

    model_config = ConfigDict(extra="forbid")

    opset: int = Field(DEFAULT_OPSET, ge=7, le=25, description="the ONNX opset to export to")
    graph_optimization: OrtLevel = Field(
        "all", description="onnxruntime's graph optimization level when the session opens the artifact")
    disabled_optimizers: list[str] = Field(default_factory=list, description="onnxruntime graph transformers "
                                           "the session must not run (an optimized file says which)")
    intra_op_threads: int | None = Field(None, ge=0, description="onnxruntime's intra-op threads (0/unset: its "
                                                                  "default)")
    external_data: Literal["auto", "always"] = Field(
        "auto", description="keep the weights in model.onnx.data beside model.onnx: always, or (auto) when they "
                            "pass 1 GiB (an ONNX file cannot pass 2 GB)")


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


_LEVELS = {"ORT_DISABLE_ALL": "disabled", "ORT_ENABLE_BASIC": "basic", "ORT_ENABLE_EXTENDED": "extended",
           "ORT_ENABLE_LAYOUT": "layout", "ORT_ENABLE_ALL": "all"}


def _adopt(base: Path, out: Path, facts: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """After an optimization recipe: keep the base file's input names, and open the file the way the recipe
    says it must be opened (`load_with`: an offline-optimized graph is not optimized again)."""
    import onnx

    base_meta = {p.key: p.value for p in onnx.load(str(base), load_external_data=False).metadata_props}
    model = onnx.load(str(out), load_external_data=False)
    if META_INPUTS in base_meta and not any(p.key == META_INPUTS for p in model.metadata_props):
        entry = model.metadata_props.add()
        entry.key, entry.value = META_INPUTS, base_meta[META_INPUTS]
        onnx.save(model, str(out))
    load_with = facts.get("load_with") or {}
    level = _LEVELS.get(str(load_with.get("graph_optimization_level")), options.get("graph_optimization", "all"))
    disabled = sorted(set(options.get("disabled_optimizers") or []) | set(load_with.get("disabled_optimizers") or []))
    return {**options, "graph_optimization": level, "disabled_optimizers": disabled}


def _localise(source: Any, path: Path, runner: Any, ev: Any, parity: Any, tol: Any) -> tuple[Any, str]:
    from portq.tasks.formats.onnx.localise import localise_onnx

    return localise_onnx(source, path, runner, ev, parity, tol)


def graph_inputs(path: Path) -> set[str] | None:
    """The inputs the ONNX file's graph takes (an exporter drops unused ones), its initializers left out."""
    if path.suffix != ".onnx":
        return None
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in proto.graph.initializer}
    return {i.name for i in proto.graph.input if i.name not in initializers}


#: the plain modules the routes that may take a TorchScript archive call besides their recipe module
_ARCHIVE_ROUTE = (*SCRIPT_REWRITES, symbolics)


ONNX = FormatHandler(
    format=Format.onnx,
    filename=FILENAME,
    routes=[
        Route("passthrough", export.onnx_passthrough),
        Route("dynamo", export.onnx_dynamo),
        Route("dynamo_decomposed", export.onnx_dynamo_decomposed),
        Route("torchscript", export.onnx_torchscript, _ARCHIVE_ROUTE),
        Route("ts2ep", export.onnx_ts2ep, SCRIPT_REWRITES),
        Route("ts2ep_decomposed", export.onnx_ts2ep_decomposed, SCRIPT_REWRITES),
    ],
    opener=runtimes.open_onnx,
    checked_open=open_checked,
    options=OnnxOptions,
    finish=_finish,
    localise=_localise,
    adopt=_adopt,
    graph_inputs=graph_inputs,
    opset_of=lambda path: onnx_opset(str(path)) if path.suffix == ".onnx" else None,
    host_copies=True,
    setup=exporter_cache.install,
    verify=_loads,
    auto_for=frozenset({"cpu", "cuda"}),
    takes=lambda kind: True,
)
FORMATS.add(Format.onnx.value, ONNX)
