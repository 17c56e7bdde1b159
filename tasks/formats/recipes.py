"""What every format's export recipes share, in plain torch: the source as an ExportedProgram with the requested
dynamic dims (`exported_program`), and the dims' torch.export and TorchScript spellings. Each format's own
recipes sit in its package (`portq.tasks.formats.onnx.export`, `...torchscript.export`, ...), and an artifact's
reproduce script carries a copy of this file's source, of its format's recipe module, and runs them the same way.

So this module stands alone: it imports only torch, numpy and onnxruntime (inside functions), never
portq (lines marked `portq-only` are dropped from the copy; the script carries the modules they name,
listed on the route). Every route has the same signature, `route(source, args, path, opts)`, where
`source` has `.module` (eager callable), `.script` (ScriptModule or None) and `.program` (ExportedProgram
or None); `args` are the example inputs as tensors; `opts` holds input_names, output_names, dynamic
({input index: {axis: dim name}}) and the format's options. A route returns notes on what it had to rewrite (or
None), which the artifact's report shows. A route that does not apply to the source raises `NotApplicable`.

TorchScript archives go through `script_prepare.prepare_script` first (fused transformer fast paths and
complex arithmetic rewritten into plain ops, checked against the archive; `portq.tasks.formats.rewrites`).
"""

from __future__ import annotations

import weakref
from typing import Any

from portq.tasks.formats.rewrites.script_prepare import prepare_script  # portq-only
from portq.tasks.formats.unfuse import unfused_table  # portq-only


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


def _torch_source(source: Any) -> None:
    if getattr(source, "onnx", None) is not None:
        raise NotApplicable("the source is already ONNX (only the passthrough route applies)")


def resized_args(args: tuple[Any, ...], opts: dict[str, Any], extra: int = 1) -> tuple[Any, ...]:
    """The example inputs with every dynamic dim `extra` longer (rows repeated from the start)."""
    import torch

    out = list(args)
    for i, axes in _dynamic(opts).items():
        for axis in axes:
            t = out[i]
            out[i] = torch.cat([t, t.narrow(axis, 0, min(extra, t.shape[axis]))], dim=axis)
    return tuple(out)
