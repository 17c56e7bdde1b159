"""The conversion recipes behind every route, in plain torch: portq runs them, and each artifact's
reproduce script carries a copy of this file's source and runs them the same way.

So this module stands alone: it imports only torch, numpy and onnxruntime (inside functions), never
portq (lines marked `portq-only` are dropped from the copy). Every route has the same signature,
`route(source, args, path, opts)`, where `source` has `.module` (eager callable), `.script`
(ScriptModule or None) and `.program` (ExportedProgram or None); `args` are the example inputs as
tensors; `opts` holds input_names, output_names, dynamic ({input index: {axis: dim name}}) and opset.
A route that does not apply to the source raises `NotApplicable`.
"""

from __future__ import annotations

from typing import Any

from portq.tasks.formats.unfuse import unfused_table  # portq-only

#: opset used when none is given
DEFAULT_OPSET = 18


class NotApplicable(Exception):
    """The route does not apply to this kind of source (skipped, not a failure)."""


def _dynamic(opts: dict[str, Any]) -> dict[int, dict[int, str]]:
    # JSON (the reproduce scripts' settings) turns int keys into strings
    return {int(i): {int(a): str(n) for a, n in axes.items()} for i, axes in (opts.get("dynamic") or {}).items()
            if axes}


def dynamic_shapes(args: tuple[Any, ...], opts: dict[str, Any]) -> tuple[Any, ...] | None:
    """torch.export dynamic_shapes: one named Dim per dim name, shared by every input that uses it."""
    import torch

    dynamic = _dynamic(opts)
    if not dynamic:
        return None
    dims: dict[str, Any] = {}
    spec = []
    for i in range(len(args)):
        axes = dynamic.get(i, {})
        spec.append({axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in axes.items()} or None)
    return tuple(spec)


def dynamic_axes(opts: dict[str, Any]) -> dict[str, dict[int, str]] | None:
    """The TorchScript-based exporter's dynamic_axes: {input name: {axis: dim name}}."""
    names = opts["input_names"]
    return {names[i]: axes for i, axes in _dynamic(opts).items()} or None


def exported_program(source: Any, args: tuple[Any, ...], opts: dict[str, Any], decompose: bool = False) -> Any:
    """An ExportedProgram of the source with the requested dynamic dims.

    A program is used as saved (its dims are as dynamic as it was exported with; on a cuda target its module
    is exported again on the device); a TorchScript module goes through TorchScript -> ExportedProgram
    conversion; an nn.Module through torch.export. With `decompose`, fused fast-path kernels and other
    non-core ops are rewritten into core ATen ops (`unfuse.unfused_table`).
    """
    import torch

    shapes = dynamic_shapes(args, opts)
    if source.program is not None:
        program = source.program
        if str(opts.get("device", "cpu")).startswith("cuda"):
            program = torch.export.export(source.module, args, dynamic_shapes=shapes)
    elif source.script is not None:
        from torch._export.converter import TS2EPConverter

        program = TS2EPConverter(source.script, args).convert()
        if shapes is not None:  # the converter traces at the example's sizes; export again with dynamic dims
            program = torch.export.export(program.module(), args, dynamic_shapes=shapes)
    else:
        program = torch.export.export(source.module, args, dynamic_shapes=shapes)
    if decompose:
        program = program.run_decompositions(unfused_table())
    return program


# ------------------------------------------------------------------------------------------------ ONNX

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


def _torch_source(source: Any) -> None:
    if getattr(source, "onnx", None) is not None:
        raise NotApplicable("the source is already ONNX (only the passthrough route applies)")


def onnx_dynamo(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """torch.onnx's dynamo exporter on the nn.Module (or the ExportedProgram)."""
    _torch_source(source)
    if source.script is not None:
        raise NotApplicable("the dynamo exporter does not take TorchScript modules")
    if source.program is not None:
        _onnx_export(exported_program(source, args, opts), args, path, opts, dynamo=True)
    else:
        _onnx_export(source.module, args, path, opts, dynamo=True,
                     dynamic_shapes=dynamic_shapes(args, opts))


def onnx_dynamo_decomposed(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """The program decomposed first (fused kernels included), then the dynamo exporter."""
    _torch_source(source)
    if source.script is not None:
        raise NotApplicable("TorchScript sources take the ts2ep routes")
    _onnx_export(exported_program(source, args, opts, decompose=True), args, path, opts, dynamo=True)


def onnx_torchscript(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """torch.onnx's TorchScript-based exporter (dynamo=False) on the ScriptModule, nn.Module or program's module."""
    _torch_source(source)
    target = source.script if source.script is not None else source.module
    if source.program is not None:
        target = _EvalOnly(target)
    _onnx_export(target, args, path, opts, dynamo=False, dynamic_axes=dynamic_axes(opts), do_constant_folding=True)


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


def onnx_ts2ep(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """A TorchScript archive converted to an ExportedProgram (TS2EPConverter), then the dynamo exporter."""
    _torch_source(source)
    if source.script is None:
        raise NotApplicable("only TorchScript sources are converted to an ExportedProgram first")
    _onnx_export(exported_program(source, args, opts), args, path, opts, dynamo=True)


def onnx_ts2ep_decomposed(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """TorchScript -> ExportedProgram, decomposed (fused kernels rewritten into plain ops), then dynamo."""
    _torch_source(source)
    if source.script is None:
        raise NotApplicable("only TorchScript sources are converted to an ExportedProgram first")
    _onnx_export(exported_program(source, args, opts, decompose=True), args, path, opts, dynamo=True)


# ----------------------------------------------------------------------------------------- TorchScript

def torchscript_passthrough(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """The source archive itself, saved again."""
    import torch

    if source.script is None:
        raise NotApplicable("the source is not a TorchScript archive")
    torch.jit.save(source.script, path)


def resized_args(args: tuple[Any, ...], opts: dict[str, Any], extra: int = 1) -> tuple[Any, ...]:
    """The example inputs with every dynamic dim `extra` longer (rows repeated from the start)."""
    import torch

    out = list(args)
    for i, axes in _dynamic(opts).items():
        for axis in axes:
            t = out[i]
            out[i] = torch.cat([t, t.narrow(axis, 0, min(extra, t.shape[axis]))], dim=axis)
    return tuple(out)


def torchscript_trace(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """torch.jit.trace of the nn.Module (or the program's module), dict and nested outputs allowed.

    With dynamic dims, the module is traced at two sizes: a trace that records a size as a constant (its
    code differs between the sizes) would compute garbage, or crash, at other sizes, so it is refused.
    """
    _torch_source(source)
    import torch

    if source.script is not None:
        raise NotApplicable("the source is already TorchScript")

    def trace(example: tuple[Any, ...]) -> Any:
        with torch.inference_mode(False), torch.no_grad():
            return torch.jit.trace(source.module, example, strict=False, check_trace=False)

    traced = trace(args)
    if _dynamic(opts):
        other = resized_args(args, opts)
        if trace(other).code != traced.code:
            dims = sorted({n for axes in _dynamic(opts).values() for n in axes.values()})
            raise RuntimeError(
                f"torch.jit.trace records the size of dynamic dim {', '.join(dims)} as a constant (the traced "
                f"code differs between sizes), so the TorchScript would be wrong at other sizes")
    torch.jit.save(traced, path)


def torchscript_frozen(in_path: str, out_path: str, opts: dict[str, Any]) -> dict[str, Any]:
    """torch.jit.freeze of a TorchScript artifact (parameters inlined as constants, Conv+BN folded). The frozen
    module is what is saved: `torch.jit.optimize_for_inference`'s MKLDNN rewrites cannot be serialized, so
    the artifact is opened with `optimize_for_inference` applied at load (its option of that name)."""
    import torch

    module = torch.jit.load(in_path, map_location="cpu").eval()
    frozen = torch.jit.freeze(module)
    torch.jit.save(frozen, out_path)
    count = sum(1 for _ in frozen.graph.nodes())
    return {"graph_nodes_before": sum(1 for _ in module.inlined_graph.nodes()), "graph_nodes_after": count,
            "load_with": {"optimize_for_inference": True}}


def torchscript_script(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """torch.jit.script of the Python nn.Module."""
    import torch

    if source.script is not None or source.program is not None:
        raise NotApplicable("only Python nn.Modules can be scripted")
    torch.jit.save(torch.jit.script(source.module), path)


# ------------------------------------------------------------------------------------ ExportedProgram, AOTI

def pt2_export(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """The program as saved, torch.export of the module, or TorchScript -> ExportedProgram; torch.export.save."""
    _torch_source(source)
    import torch

    torch.export.save(exported_program(source, args, opts), path)


def aoti_inductor(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """The ExportedProgram compiled by AOTInductor into a package for the target device."""
    _torch_source(source)
    import torch

    torch._inductor.aoti_compile_and_package(exported_program(source, args, opts), package_path=path)
