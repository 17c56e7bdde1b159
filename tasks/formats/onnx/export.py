"""The ONNX export recipes, in plain torch and onnx: the routes of `portq.tasks.formats.onnx` (the ladder its
docstring lists). An ONNX artifact's reproduce script carries a copy of this file's source (and of the shared
`portq.tasks.formats.recipes`) and runs them the same way; so it imports torch and onnx inside functions, never
portq (lines marked `portq-only` are dropped from the copy, the script carries what they name).
"""

from __future__ import annotations

from typing import Any

from portq.tasks.formats.onnx.symbolics import torchscript_symbolics  # portq-only
from portq.tasks.formats.recipes import (  # portq-only
    NotApplicable,
    _check_sets,
    _dynamic,
    _retry_with_auto_dims,
    _torch_source,
    dynamic_axes,
    dynamic_shapes,
    exported_program,
)
from portq.tasks.formats.rewrites.script_complex import typed_function  # portq-only
from portq.tasks.formats.rewrites.script_prepare import prepare_script  # portq-only

#: opset used when none is given
DEFAULT_OPSET = 18


def onnx_opset(model: Any) -> int | None:
    """The default-domain opset an ONNX model holds: a loaded ModelProto, or the file at a path (its graph only;
    external weights are not read). The one place portq reads an opset."""
    if isinstance(model, str):
        import onnx

        model = onnx.load(model, load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


#: Weights above this many bytes go to external data (`model.onnx.data`) when `external_data` is "auto": a
#: protobuf file cannot pass 2 GB, and onnxruntime maps external weights instead of parsing them.
EXTERNAL_DATA_BYTES = 1 << 30


def weight_bytes(target: Any) -> int:
    """Bytes of weights (parameters, buffers, an ExportedProgram's constants) the export will carry."""
    tensors: list[Any] = []
    state = getattr(target, "state_dict", None)
    tensors += list((state() if callable(state) else state or {}).values())
    tensors += list((getattr(target, "constants", None) or {}).values())
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors if hasattr(t, "element_size"))


def external_data_wanted(target: Any, opts: dict[str, Any]) -> bool:
    """Whether the ONNX file keeps its weights in external data: always, or (auto) when they are large."""
    mode = opts.get("external_data") or "auto"
    return mode == "always" or weight_bytes(target) > EXTERNAL_DATA_BYTES


def onnx_weights_beside(path: str, external: bool) -> None:
    """Leave the ONNX file at `path` with its external weights, if any, in one file beside it, `<name>.data`.

    Exporters differ: the dynamo exporter writes `<name>.data` (or nothing, for small weights); the TorchScript-
    based exporter, past 2 GB, one file per tensor. With `external`, small weights are moved out too. The file
    and its data are one artifact: every runtime finds the data through the file's relative reference.
    """
    import os

    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    header = onnx.load(path, load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in _get_all_tensors(header) if uses_external_data(t)}
    data_name = os.path.basename(path) + ".data"
    if locations == {data_name} or not (external or locations):
        return
    model = onnx.load(path)  # the weights, from wherever the exporter put them
    folder = os.path.dirname(os.path.abspath(path))
    for location in locations | {data_name}:
        if os.path.exists(os.path.join(folder, location)):
            os.remove(os.path.join(folder, location))
    # tensors of a few elements (a TopK's k, a Reshape's shape) stay inline: onnxruntime's shape inference
    # must read them from the graph
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=64)


def _onnx_export(target: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any], **kw: Any) -> None:
    import torch

    external = external_data_wanted(target, opts)
    if kw.get("dynamo"):
        kw["external_data"] = external
    torch.onnx.export(target, args, path, opset_version=opts.get("opset") or DEFAULT_OPSET,
                      input_names=opts["input_names"], output_names=opts["output_names"], verbose=False, **kw)
    onnx_weights_beside(path, external)


def onnx_passthrough(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """The source ONNX file itself (external data, if any, written beside it): what `portq optimize` starts from."""
    import os

    import onnx

    if getattr(source, "onnx", None) is None:
        raise NotApplicable("the source is not an ONNX file")
    model = onnx.load(source.onnx, load_external_data=True)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = (opts.get("external_data") or "auto") == "always" or size > EXTERNAL_DATA_BYTES
    onnx.save_model(model, path, save_as_external_data=size > EXTERNAL_DATA_BYTES, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data")
    onnx_weights_beside(path, external)



def onnx_dynamo(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> list[str] | None:
    """torch.onnx's dynamo exporter on the nn.Module (or the ExportedProgram)."""
    _torch_source(source)
    if source.script is not None:
        raise NotApplicable("the dynamo exporter does not take TorchScript modules")
    if source.program is not None:
        _onnx_export(exported_program(source, args, opts), args, path, opts, dynamo=True)
        return None
    notes: list[str] = []
    _retry_with_auto_dims(lambda auto: _onnx_export(source.module, args, path, opts, dynamo=True,
                                                    dynamic_shapes=dynamic_shapes(args, opts, auto=auto)), notes)
    return notes


def onnx_dynamo_decomposed(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> list[str]:
    """The program decomposed first (fused kernels included), then the dynamo exporter."""
    _torch_source(source)
    if source.script is not None:
        raise NotApplicable("TorchScript sources take the ts2ep routes")
    notes: list[str] = []
    _onnx_export(exported_program(source, args, opts, decompose=True, notes=notes), args, path, opts, dynamo=True)
    return notes


def onnx_torchscript(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> list[str] | None:
    """torch.onnx's TorchScript-based exporter (dynamo=False) on the ScriptModule, nn.Module or program's module.

    An archive is prepared first (`prepare_script`), then exported as a function of its frozen graph with every
    value typed, and the symbolics this exporter lacks registered for the one export. A program that computes with
    complex values is traced first and prepared the same way."""
    _torch_source(source)
    opset = opts.get("opset") or DEFAULT_OPSET
    script = source.script
    if source.program is not None:
        if _dynamic(opts) and _reads_sizes(source.program):
            raise RuntimeError("the TorchScript-based exporter traces an ExportedProgram's module, and the program "
                               "reads its dynamic sizes (aten.sym_size), which tracing fixes to the example's; it "
                               "would be wrong at other sizes, so this route takes such programs only without "
                               "dynamic dims")
        if _complex_values(source.program):
            script = _traced(_EvalOnly(source.module), args)
    if script is not None:
        checks = _check_sets(args, opts)
        prepared, notes = prepare_script(script, args, checks)
        with torchscript_symbolics(opset):
            _onnx_export(typed_function(prepared, checks), args, path, opts, dynamo=False,
                         dynamic_axes=dynamic_axes(opts), do_constant_folding=True)
        _constants_to_initializers(path)
        onnx_weights_beside(path, _external_for_file(path, opts))  # the weights are initializers only now
        _check_onnx(path)
        return notes
    target = source.module if source.program is None else _EvalOnly(source.module)
    _onnx_export(target, args, path, opts, dynamo=False, dynamic_axes=dynamic_axes(opts), do_constant_folding=True)
    return None


def _external_for_file(path: str, opts: dict[str, Any]) -> bool:
    """external_data_wanted for an ONNX file already written: always, or (auto) when its weights are large."""
    import onnx

    if (opts.get("external_data") or "auto") == "always":
        return True
    header = onnx.load(path, load_external_data=False)
    return sum(len(t.raw_data) for t in header.graph.initializer) > EXTERNAL_DATA_BYTES


def _constants_to_initializers(path: str) -> None:
    """Weights of an exported function come out as Constant nodes (the graph was frozen): make them initializers,
    where ONNX tools (optimizers, quantizers, editors) look for weights, as a module's export has them."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
        onnx.save(model, path)


def _check_onnx(path: str) -> None:
    """The ONNX checker with strict type and shape inference: a graph the exporter typed wrongly (an op given a
    type it does not take) fails this route here, so the next one is tried, rather than failing in onnxruntime."""
    import onnx

    onnx.checker.check_model(path, full_check=True)


def _complex_values(program: Any) -> bool:
    import torch

    return any(isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].is_complex()
               for node in program.graph.nodes)


def _traced(module: Any, args: tuple[Any, ...]) -> Any:
    """A TorchScript trace in eval mode (freezing folds weights into constants only there)."""
    import torch

    with torch.no_grad():
        return torch.jit.trace(module, args, strict=False, check_trace=False).eval()


def _reads_sizes(program: Any) -> bool:
    import torch

    return any(node.target is torch.ops.aten.sym_size.int for node in program.graph.nodes)


def _EvalOnly(module: Any) -> Any:  # noqa: N802  (a class made on demand, so torch is imported late)
    """An ExportedProgram's module refuses train(), which the TorchScript-based exporter calls to switch to eval
    mode; the program is an inference graph already, so switching is a no-op."""
    import torch

    class EvalOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> Any:
            return self.inner(*args)

        def train(self, mode: bool = True) -> EvalOnly:
            return self

    return EvalOnly(module)


def onnx_ts2ep(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> list[str]:
    """A TorchScript archive converted to an ExportedProgram (TS2EPConverter), then the dynamo exporter."""
    _torch_source(source)
    if source.script is None:
        raise NotApplicable("only TorchScript sources are converted to an ExportedProgram first")
    notes: list[str] = []
    _onnx_export(exported_program(source, args, opts, notes=notes), args, path, opts, dynamo=True)
    return notes


def onnx_ts2ep_decomposed(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> list[str]:
    """TorchScript -> ExportedProgram, decomposed (fused kernels rewritten into plain ops), then dynamo."""
    _torch_source(source)
    if source.script is None:
        raise NotApplicable("only TorchScript sources are converted to an ExportedProgram first")
    notes: list[str] = []
    _onnx_export(exported_program(source, args, opts, decompose=True, notes=notes), args, path, opts, dynamo=True)
    return notes
