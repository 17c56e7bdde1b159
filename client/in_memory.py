"""Submitting an `nn.Module` object: saved as a file a worker can load, with its example inputs.

A worker never receives Python objects, only files in the store (`portq.tasks.state.submission`), so a module
is saved first, in the caller's process:

1. `torch.export` with its example inputs, saved as a `.pt2`. The program carries the example inputs, and the
   requested `dynamic=["batch"]` is exported as a dynamic batch dim, so every route can use it;
2. where torch.export fails, a TorchScript trace (`torch.jit.trace`, under no_grad) with the example inputs in a
   sidecar `.npz`, which is how a user would send it by hand.

Without example inputs neither is possible, and the module is refused with what to pass. The job's source is the
file saved (named after the module's class), and its record says that it came from an in-memory module.
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portq.tasks.core.errors import InputError, first_line


@dataclass(frozen=True)
class SavedModule:
    path: Path  # the saved file (and its sidecar .npz, for a trace)
    display: str  # what records, tables and errors call it


def is_module(obj: object) -> bool:
    """An nn.Module, without importing torch for callers that only pass paths."""
    return any(f"{c.__module__}.{c.__name__}" == "torch.nn.modules.module.Module" for c in type(obj).__mro__)


def module_name(module: Any, taken: set[str]) -> str:
    """A file stem for the module: its class name in snake case, numbered when the batch has it already."""
    stem = re.sub(r"(?<!^)(?=[A-Z])", "_", type(module).__name__).lower() or "module"
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}_{n}", n + 1
    taken.add(name)
    return name


def save_module(module: Any, example_inputs: Any, directory: Path, name: str, dynamic: list[str]) -> SavedModule:
    """The module saved under `directory` as `<name>.pt2` (torch.export), else `<name>.pt` + `<name>.npz` (trace)."""
    import numpy as np
    import torch

    display = f"<in-memory {type(module).__name__}>"
    if example_inputs is None:
        raise InputError("an in-memory nn.Module needs example inputs to be saved as a file a worker can load",
                         step="submit", file=display,
                         hint="pass example_inputs=(tensor, ...) with the module, in forward-argument order")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise InputError("example_inputs must be tensors (a tensor, or a tuple of tensors in forward-argument "
                         "order)", step="submit", file=display)
    module = module.eval()
    shapes = None
    if "batch" in dynamic:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} if a.dim() else None for a in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(module, args, dynamic_shapes=shapes)
            path = directory / f"{name}.pt2"
            torch.export.save(program, str(path))
            return SavedModule(path, display + " (saved by torch.export)")
        except Exception as e:
            exported = first_line(e, 200)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(module, args, strict=False, check_trace=False)
        except Exception as e:
            raise InputError(f"could not save the module as a file: torch.export failed ({exported}) and so did "
                             f"torch.jit.trace ({first_line(e, 200)})", step="submit", file=display,
                             hint="save it yourself (a state dict with --arch, TorchScript or a .pt2) and submit "
                                  "the file") from None
    path = directory / f"{name}.pt"
    torch.jit.save(traced, str(path))
    names = _forward_names(module, len(args))
    np.savez(path.with_suffix(".npz"), **{n: a.detach().cpu().numpy() for n, a in zip(names, args)})
    return SavedModule(path, display + " (saved by torch.jit.trace)")


def _forward_names(module: Any, count: int) -> list[str]:
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]
