"""State dicts, training checkpoints, safetensors and (opt-in) whole pickled modules.

`torch.load` runs with `weights_only=True` unless the submission passed `--trust-pickle`: the
restricted unpickler refuses any global it does not know *before* constructing it, so a malicious
pickle is rejected without running its payload.
"""

from __future__ import annotations

import importlib
import pickle
from typing import Any

from portq.tasks.core.errors import ModelLoadError, UnsafeModelError, first_line
from portq.tasks.sources.loaded import LoadedModel, LoadRequest, float_equivalent
from portq.tasks.sources.recipes import find_state_dict, strip_wrapper_prefix


def load_torch_save(req: LoadRequest) -> LoadedModel:
    import torch

    try:
        obj = torch.load(str(req.path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not req.trust_pickle:
            raise UnsafeModelError(
                "file holds pickled Python objects beyond tensors (for example a whole module saved with "
                f"torch.save(model)); loading it would run code from the file, so it was refused unread "
                f"({first_line(e)})",
                step="load", file=req.display,
                hint="save a TorchScript archive, a .pt2 ExportedProgram or a state dict instead, or resubmit "
                     "with --trust-pickle if you trust where the file came from",
            ) from None
        obj = torch.load(str(req.path), map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        module, notes = float_equivalent(obj, req.display)
        return LoadedModel(kind="pickled_module", module=module, input_names=_forward_names(obj), notes=notes)
    state = find_state_dict(obj)
    if state is None:
        raise ModelLoadError(f"torch.save file holds a {type(obj).__name__}, not a module, state dict or "
                             "checkpoint with a state dict", step="load", file=req.display)
    return _build_from_state(req, state, kind="state_dict")


def load_safetensors(req: LoadRequest) -> LoadedModel:
    from safetensors.torch import load_file

    try:
        state = load_file(str(req.path), device="cpu")
    except Exception as e:
        raise ModelLoadError(f"cannot read safetensors file: {first_line(e)}", step="load", file=req.display) from e
    return _build_from_state(req, state, kind="safetensors")


def import_arch(arch: str, display: str) -> Any:
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"--arch {arch!r} is not of the form package.module:Class", step="load", file=display)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelLoadError(f"--arch {arch!r}: cannot import {module_name!r} ({e})", step="load", file=display,
                             hint="the model code must be importable on the worker (installed or on PYTHONPATH)") from e
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelLoadError(f"--arch {arch!r}: {module_name} has no attribute {attr!r}", step="load", file=display)
        target = getattr(target, part)
    return target


def _build_from_state(
    req: LoadRequest, state: dict[str, Any], kind: str
) -> LoadedModel:
    if not req.arch:
        raise ModelLoadError(f"file is a {kind.replace('_', ' ')} ({len(state)} tensors) with no model code",
                             step="load", file=req.display,
                             hint="name the architecture with --arch package.module:Class (and --arch-kwargs JSON)")
    cls = import_arch(req.arch, req.display)
    try:
        module = cls(**req.arch_kwargs)
    except Exception as e:
        raise ModelLoadError(f"--arch {req.arch}: constructing it with {req.arch_kwargs} failed: {first_line(e)}",
                             step="load", file=req.display) from e
    try:
        module.load_state_dict(strip_wrapper_prefix(state), strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"weights do not fit --arch {req.arch}: {first_line(e)}", step="load",
                             file=req.display, hint="check --arch-kwargs against the checkpoint's config") from e
    return LoadedModel(kind=kind, module=module, input_names=_forward_names(module))


def _forward_names(module: Any) -> list[str]:
    import inspect

    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

