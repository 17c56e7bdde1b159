"""The conversion recipes behind every route, in plain torch: portq runs them, and each artifact's
reproduce script carries a copy of this file's source and runs them the same way.

So this module stands alone: it imports only torch, numpy and onnxruntime (inside functions), never
portq (lines marked `portq-only` are dropped from the copy; the script carries the modules they name,
listed on the route). Every route has the same signature, `route(source, args, path, opts)`, where
`source` has `.module` (eager callable), `.script` (ScriptModule or None) and `.program` (ExportedProgram
or None); `args` are the example inputs as tensors; `opts` holds input_names, output_names, dynamic
({input index: {axis: dim name}}) and opset. A route returns notes on what it had to rewrite (or None),
which the artifact's report shows. A route that does not apply to the source raises `NotApplicable`.

TorchScript archives go through `script_prepare.prepare_script` first (fused transformer fast paths and
complex arithmetic rewritten into plain ops, checked against the archive), and the TorchScript-based
exporter gets every value's dtype and rank (`script_complex.typed_function`) and the symbolics it lacks
(`symbolics.torchscript_symbolics`: diff, the FFT family, unfold with dynamic sizes).
"""

from __future__ import annotations

import weakref
from typing import Any

from portq.tasks.formats.script_complex import typed_function  # portq-only
from portq.tasks.formats.script_prepare import prepare_script  # portq-only
from portq.tasks.formats.symbolics import torchscript_symbolics  # portq-only
from portq.tasks.formats.unfuse import unfused_table  # portq-only

#: opset used when none is given
DEFAULT_OPSET = 18


class NotApplicable(Exception):
    """The route does not apply to this kind of source (skipped, not a failure)."""


def _dynamic(opts: dict[str, Any]) -> dict[int, dict[int, str]]:
    # JSON (the reproduce scripts' settings) turns int keys into strings
    return {int(i): {int(a): str(n) for a, n in axes.items()} for i, axes in (opts.get("dynamic") or {}).items()
            if axes}


def dynamic_shapes(args: tuple[Any, ...], opts: dict[str, Any], auto: bool = False) -> tuple[Any, ...] | None:
    """torch.export dynamic_shapes: one named Dim per dim name, shared by every input that uses it; with `auto`,
    Dim.DYNAMIC for each (torch.export then infers each dim's range and its relations to the others)."""
    import torch

    dynamic = _dynamic(opts)
    if not dynamic:
        return None
    dims: dict[str, Any] = {}
    spec = []
    for i in range(len(args)):
        axes = dynamic.get(i, {})
        if auto:
            spec.append({axis: torch.export.Dim.DYNAMIC for axis in axes} or None)
        else:
            spec.append({axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in axes.items()} or None)
    return tuple(spec)


def dynamic_axes(opts: dict[str, Any]) -> dict[str, dict[int, str]] | None:
    """The TorchScript-based exporter's dynamic_axes: {input name: {axis: dim name}}."""
    names = opts["input_names"]
    return {names[i]: axes for i, axes in _dynamic(opts).items()} or None


def _refined_dims(e: BaseException) -> bool:
    """torch.export refused the named dims only because it narrowed their range or related them ("Constraints
    violated ... Suggested fixes"), e.g. a minimum length that a frame count needs."""
    text, seen = "", 0
    cur: BaseException | None = e
    while cur is not None and seen < 6:
        text += str(cur)
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return "Constraints violated" in text or "Suggested fixes" in text


def export_with_dims(module: Any, args: tuple[Any, ...], opts: dict[str, Any], notes: list[str]) -> Any:
    """torch.export.export with the named dynamic dims; when export only refines their ranges or relations, again
    with Dim.DYNAMIC, which accepts the refinement. A dim the code really fixes to one size fails both ways, and
    the named dims' error is raised (it names the dim)."""
    import torch

    return _retry_with_auto_dims(lambda auto: torch.export.export(
        module, args, dynamic_shapes=dynamic_shapes(args, opts, auto=auto)), notes)


#: the note a route returns when the named dims had to become Dim.DYNAMIC
AUTO_DIMS_NOTE = ("torch.export narrowed the dynamic dims' ranges (e.g. a minimum length); exported with "
                  "Dim.DYNAMIC, which keeps the narrowed ranges")


def _retry_with_auto_dims(export: Any, notes: list[str]) -> Any:
    """export(auto=False); on a refinement of the named dims, export(auto=True) with a note."""
    try:
        return export(False)
    except Exception as e:
        if not _refined_dims(e):
            raise
        named = e
    try:
        result = export(True)
    except Exception:
        raise named from None
    notes.append(AUTO_DIMS_NOTE)
    return result


def _check_sets(args: tuple[Any, ...], opts: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The example inputs, and with dynamic dims the same one longer: what rewrites are checked and typed on."""
    return [args, resized_args(args, opts)] if _dynamic(opts) else [args]


def fresh_program(program: Any) -> Any:
    """An independent copy of an ExportedProgram (an in-memory save and load). torch.onnx.export can leave a
    program's shape environment with pending unbacked symbols (mixture-of-experts routing with torch.where), and
    the next run_decompositions on that object fails with PendingUnbackedSymbolNotFound; a loaded copy does not
    share that state (copy.deepcopy does)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


#: loaded programs already handed to an export once: any later export gets a fresh copy (`fresh_program`)
_HANDED_OUT: weakref.WeakSet[Any] = weakref.WeakSet()


def program_for_export(program: Any) -> Any:
    """The loaded program itself for its first export, a fresh copy for every later one. The copy costs a save and
    a load (0.2 s for a small BERT); a step's process loads its source for one export, which needs none."""
    try:
        first = program not in _HANDED_OUT
        _HANDED_OUT.add(program)
    except TypeError:  # not weakly referenceable: always a copy, as before
        first = False
    return program if first else fresh_program(program)


def exported_program(source: Any, args: tuple[Any, ...], opts: dict[str, Any], decompose: bool = False,
                     notes: list[str] | None = None) -> Any:
    """An ExportedProgram of the source with the requested dynamic dims.

    A program is used as saved, itself for its first export and a fresh copy after (its dims are as dynamic as it
    was exported with; on a cuda target its module is exported again on the device); a TorchScript module is
    prepared (`prepare_script`), then converted by TorchScript -> ExportedProgram; an nn.Module goes through
    torch.export. With `decompose`, fused
    fast-path kernels and other non-core ops are rewritten into core ATen ops (`unfuse.unfused_table`). What had
    to be rewritten is appended to `notes`.
    """
    import torch

    notes = [] if notes is None else notes
    if source.program is not None:
        if str(opts.get("device", "cpu")).startswith("cuda"):  # the source's module is on the device already
            program = torch.export.export(source.module, args, dynamic_shapes=dynamic_shapes(args, opts))
        else:
            program = program_for_export(source.program)
    elif source.script is not None:
        from torch._export.converter import TS2EPConverter

        script, rewrites = prepare_script(source.script, args, _check_sets(args, opts))
        notes += rewrites
        program = TS2EPConverter(script, args).convert()
        if _dynamic(opts):  # the converter traces at the example's sizes; export again with dynamic dims
            program = export_with_dims(program.module(), args, opts, notes)
    else:
        program = export_with_dims(source.module, args, opts, notes)
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

#: the `autocast` option of the ExportedProgram and AOTInductor formats: the half precision matmuls and
#: convolutions compute in (their fp16 and bf16 variants)
AUTOCAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def _float_outputs(module: Any) -> Any:
    """`module` with every floating-point output cast to float32 (a half-precision artifact keeps fp32 I/O)."""
    import torch
    from torch.utils._pytree import tree_map

    class FloatOutputs(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> Any:
            return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                            self.inner(*args))

    return FloatOutputs(module)


def autocast_program(program: Any, args: tuple[Any, ...], opts: dict[str, Any], notes: list[str]) -> Any:
    """The program exported again under `torch.autocast` in the `autocast` precision (fp16 or bf16).

    Decomposed to ATen inside the autocast region, so the casts autocast inserts (inputs of matmuls and
    convolutions to half precision, precision-sensitive ops kept in float32) become ops of the graph; the
    weights stay float32 and the outputs are cast back to float32, so the artifact takes and returns what the
    source does. This is the route for AOTInductor in half precision: compiling a model cast to half
    (`.half()`) crashed the process on an H200 (torch 2.11), while a float32 program compiles.
    """
    import torch

    precision = opts["autocast"]
    dtype = getattr(torch, AUTOCAST_DTYPES[precision])
    device = "cuda" if str(opts.get("device", "cpu")).startswith("cuda") else "cpu"
    dims = dynamic_shapes(args, opts)
    with torch.autocast(device, dtype=dtype):
        program = torch.export.export(_float_outputs(program.module()), args,
                                      dynamic_shapes=None if dims is None else (dims,)).run_decompositions({})
    notes.append(f"exported under torch.autocast({device!r}, {dtype}): matmuls and convolutions compute in "
                 f"{precision}, weights and inputs and outputs stay float32")
    return program


def _program(source: Any, args: tuple[Any, ...], opts: dict[str, Any], notes: list[str]) -> Any:
    program = exported_program(source, args, opts, notes=notes)
    return autocast_program(program, args, opts, notes) if opts.get("autocast") else program


def pt2_export(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> list[str]:
    """The program as saved, torch.export of the module, or TorchScript -> ExportedProgram; torch.export.save.
    With `autocast`: in half precision (`autocast_program`)."""
    _torch_source(source)
    import torch

    notes: list[str] = []
    torch.export.save(_program(source, args, opts, notes), path)
    return notes


def aoti_inductor(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> list[str]:
    """The ExportedProgram compiled by AOTInductor into a package for the target device (with `max_autotune`:
    inductor benchmarks kernel choices while compiling; slower to build, sometimes faster to run on a GPU; with
    `autocast`: in half precision, `autocast_program`)."""
    _torch_source(source)
    import torch

    notes: list[str] = []
    configs = {"max_autotune": True} if opts.get("max_autotune") else None
    torch._inductor.aoti_compile_and_package(_program(source, args, opts, notes), package_path=path,
                                             inductor_configs=configs)
    return notes
