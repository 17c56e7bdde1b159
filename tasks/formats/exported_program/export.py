"""The ExportedProgram export recipe, in plain torch: `torch.export.save` of the source's program, in half precision
under `torch.autocast` for the fp16 and bf16 variants. The AOTInductor recipe compiles the same program. Their
reproduce scripts carry a copy of this file's source (and of the shared `portq.tasks.formats.recipes`).
"""

from __future__ import annotations

from typing import Any

from portq.tasks.formats.recipes import _torch_source, dynamic_shapes, exported_program  # portq-only

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
