"""ONNX: exported by torch.onnx through a ladder of routes, run in onnxruntime on the target device.

Routes, in the order tried (recipes in `portq.tasks.formats.recipes`):
  dynamo             torch.onnx.export(dynamo=True) on the nn.Module or ExportedProgram
  dynamo_decomposed  the ExportedProgram decomposed first (fused fast-path kernels rewritten), then dynamo
  torchscript        torch.onnx.export(dynamo=False), the TorchScript-based exporter: on a ScriptModule, an
                     nn.Module or the program's module
  ts2ep              a TorchScript archive converted to an ExportedProgram (TS2EPConverter), then dynamo
  ts2ep_decomposed   the same, decomposed first
For TorchScript sources the dynamo routes do not apply, so the TorchScript-based exporter goes first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from portq.tasks.checks.runners import NamedArrays
from portq.tasks.core.contract import Format
from portq.tasks.core.errors import DeviceUnavailableError
from portq.tasks.formats import recipes
from portq.tasks.formats.base import FORMATS, ExportRequest, ExportResult, FormatHandler, Route

#: Opset used when --opset is not given (every route honours it; the report records what the file holds).
DEFAULT_OPSET = recipes.DEFAULT_OPSET
FILENAME = "model.onnx"
_META_INPUTS = "portq.input_names"


def _finish(req: ExportRequest, path: Path, route: str) -> ExportResult:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    _name_dynamic_dims(model, req)
    entry = model.metadata_props.add()
    entry.key, entry.value = _META_INPUTS, json.dumps(req.input_names)
    # Loaded without external data, the proto keeps its references to any external tensor files.
    onnx.save(model, str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
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


class OrtRunner:
    """An onnxruntime session pinned to the target device; never silently on the CPU for a cuda target."""

    def __init__(self, path: Path, device: str):
        import onnxruntime as ort

        self.device = device
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DeviceUnavailableError(
                    "onnxruntime on this worker has no CUDAExecutionProvider, so the ONNX artifact cannot run on the "
                    "cuda target; portq refuses to report CPU numbers as GPU numbers",
                    step="session:onnx", hint="install onnxruntime-gpu on gpu workers",
                )
            providers: list[Any] = ["CUDAExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        used = self.session.get_providers()
        if device.startswith("cuda") and (not used or used[0] != "CUDAExecutionProvider"):
            raise DeviceUnavailableError(f"onnxruntime fell back to {used} for a cuda target", step="session:onnx")
        self.providers = used
        graph_inputs = [i.name for i in self.session.get_inputs()]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.input_names = json.loads(meta[_META_INPUTS]) if _META_INPUTS in meta else graph_inputs
        self.graph_inputs = set(graph_inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def prepare(self, sample: list[np.ndarray]) -> dict[str, np.ndarray]:
        if len(sample) != len(self.input_names):
            raise ValueError(f"artifact takes {len(self.input_names)} inputs, sample has {len(sample)}")
        # The exporter drops inputs the graph does not use; feed only the ones it kept.
        return {n: np.ascontiguousarray(a) for n, a in zip(self.input_names, sample) if n in self.graph_inputs}

    def run(self, prepared: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, prepared)

    def outputs(self, raw: list[np.ndarray]) -> NamedArrays:
        return [(n, np.asarray(a)) for n, a in zip(self.output_names, raw)]


FORMATS.add(
    Format.onnx.value,
    FormatHandler(
        format=Format.onnx,
        filename=FILENAME,
        routes=[
            Route("dynamo", recipes.onnx_dynamo),
            Route("dynamo_decomposed", recipes.onnx_dynamo_decomposed),
            Route("torchscript", recipes.onnx_torchscript),
            Route("ts2ep", recipes.onnx_ts2ep),
            Route("ts2ep_decomposed", recipes.onnx_ts2ep_decomposed),
        ],
        open_runner=OrtRunner,
        finish=_finish,
    ),
)
