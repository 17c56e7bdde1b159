"""The AOTInductor export recipe, in plain torch: the ExportedProgram (`portq.tasks.formats.exported_program.export`)
compiled into a package for the target device. Its reproduce script carries a copy of this file's source and of the
modules it names.
"""

from __future__ import annotations

from typing import Any

from portq.tasks.formats.exported_program.export import _program  # portq-only
from portq.tasks.formats.recipes import _torch_source  # portq-only


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
