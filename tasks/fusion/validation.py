"""What every fusion method checks before it combines anything, in plain torch: member lists, weights,
labels, architectures, and the output structures the output-space methods combine leaf by leaf.

portq runs these checks and every reproduce script of a fused artifact carries a copy of this file, so it
imports only torch and numpy, never portq. A check that fails raises `FusionError` with a message that
names the method, the members and what is wrong; portq turns it into a failed `fuse` step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn


class FusionError(ValueError):
    """The members, parameters or data cannot be fused as asked; the message says which and why."""


def tensor_shape(t: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def error_line(e: BaseException) -> str:
    """`Type: first line of the message`: torch's errors run to pages."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def named_members(members: Any, names: list[str] | None, method: str, min_count: int = 2,
                  what: str = "models") -> tuple[list[str], list[Any]]:
    """(names, members) from a list, or a dict name -> member; default names are member0, member1, ..."""
    if isinstance(members, (nn.Module, torch.Tensor)) or is_state_dict(members):
        single = "state dict" if is_state_dict(members) else type(members).__name__
        raise FusionError(f"{method}: members must be a list (or a dict name -> model) of models, got a single "
                          f"{single}")
    if isinstance(members, dict):
        items = list(members.values())
        names = names if names is not None else [str(k) for k in members]
    else:
        items = list(members)
    names = [str(n) for n in names] if names is not None else [f"member{i}" for i in range(len(items))]
    if len(names) != len(items):
        raise FusionError(f"{method}: got {len(names)} names for {len(items)} members")
    if len(items) < min_count:
        raise FusionError(f"{method}: needs at least {min_count} {what}, got {len(items)}")
    return names, items


def check_weights(weights: Any, n: int, method: str, normalize: bool = True,
                  require_positive_sum: bool = True) -> list[float]:
    """One finite weight per member (None: all 1.0); normalised to sum 1 when `normalize`.

    The sum must be positive unless `require_positive_sum` is off (task arithmetic negates task vectors
    with negative weights).
    """
    if weights is None:
        w = [1.0] * n
    else:
        if isinstance(weights, (int, float)) or (isinstance(weights, torch.Tensor) and weights.dim() == 0):
            raise FusionError(f"{method}: weights must be a sequence with one number per member")
        w = [float(x) for x in weights]
        if len(w) != n:
            raise FusionError(f"{method}: got {len(w)} weights for {n} members")
        if not all(np.isfinite(x) for x in w):
            raise FusionError(f"{method}: weights must be finite numbers, got {w}")
    total = 0.0
    for x in w:  # a plain left-to-right sum: the same float in every process
        total += x
    if require_positive_sum and not total > 0:
        raise FusionError(f"{method}: weights must sum to a positive value, got sum {total!r}")
    return [x / total for x in w] if normalize else w


def is_class_labels(labels: Any) -> bool:
    return isinstance(labels, torch.Tensor) and not (labels.is_floating_point() or labels.is_complex()
                                                     or labels.dtype == torch.bool)


def check_labels(outputs: Any, labels: Any, kind: str, where: str = "labels") -> None:
    """Labels that fit the outputs: kind "class" wants integers in [0, C) of shape (N,) for (N, C) outputs,
    kind "regression" targets of exactly the output's shape."""
    if not isinstance(labels, torch.Tensor):
        raise FusionError(f"{where}: expected a tensor, got {type(labels).__name__}")
    if not isinstance(outputs, torch.Tensor):
        raise FusionError(f"{where}: the model must return a single tensor, got {type(outputs).__name__}")
    if kind == "class":
        if not is_class_labels(labels):
            raise FusionError(f"{where}: class labels must be integers, got dtype {labels.dtype}")
        if outputs.dim() != 2:
            raise FusionError(f"{where}: class labels need (N, C) outputs, got output shape {tensor_shape(outputs)}")
        n, c = tensor_shape(outputs)
        if labels.dim() != 1 or labels.shape[0] != n:
            raise FusionError(f"{where}: got labels of shape {tensor_shape(labels)} for outputs of shape {(n, c)}; "
                              f"need shape ({n},)")
        if n > 0:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= c:
                bad = lo if lo < 0 else hi
                raise FusionError(f"{where}: label {bad} is out of range for {c} classes (valid 0..{c - 1})")
    elif kind == "regression":
        if tensor_shape(labels) != tensor_shape(outputs):
            raise FusionError(f"{where}: target shape {tensor_shape(labels)} does not match output shape "
                              f"{tensor_shape(outputs)}")
    else:
        raise FusionError(f"{where}: unknown label kind {kind!r}")


def as_args(inputs: Any, what: str = "inputs") -> tuple[Any, ...]:
    """A tensor -> (tensor,); a tuple or list of tensors -> a tuple of positional arguments."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and len(inputs) > 0:
        return tuple(inputs)
    raise FusionError(f"{what}: expected a tensor or a non-empty tuple of tensors, got {type(inputs).__name__}")


def as_batches(calibration_inputs: Any) -> list[tuple[Any, ...]]:
    """A tensor or tuple is one batch of positional arguments; a list is several batches."""
    if isinstance(calibration_inputs, list):
        if not calibration_inputs:
            raise FusionError("calibration_inputs: got an empty list of batches")
        return [as_args(b, "calibration_inputs") for b in calibration_inputs]
    return [as_args(calibration_inputs, "calibration_inputs")]


# ------------------------------------------------------------- output structures (tensors or nested containers)


def output_structure(out: Any) -> str:
    """`tuple(Tensor, dict('emb': Tensor))`: how an output is nested, for messages."""
    if isinstance(out, torch.Tensor):
        return "Tensor"
    if isinstance(out, dict):
        return "dict(" + ", ".join(f"{k!r}: {output_structure(v)}" for k, v in out.items()) + ")"
    if isinstance(out, (tuple, list)):
        kind = "list" if isinstance(out, list) else "tuple"
        return kind + "(" + ", ".join(output_structure(v) for v in out) + ")"
    return type(out).__name__


def output_leaves(out: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every tensor of an output with its path (`[1]['emb']`), in order."""
    if isinstance(out, torch.Tensor):
        return [(path, out)]
    if isinstance(out, dict):
        return [leaf for k, v in out.items() for leaf in output_leaves(v, f"{path}[{k!r}]")]
    if isinstance(out, (tuple, list)):
        return [leaf for i, v in enumerate(out) for leaf in output_leaves(v, f"{path}[{i}]")]
    raise FusionError(f"unsupported output type {type(out).__name__} at output{path}")


def describe_shapes(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return str(tensor_shape(out))
    return "{" + ", ".join(f"output{p}: {tensor_shape(t)}" for p, t in output_leaves(out)) + "}"


def combine_leaves(outs: list[Any], fn: Callable[[list[Any]], Any]) -> Any:
    """`fn(leaves)` applied leaf by leaf across the members' outputs, keeping the first member's structure."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return fn(outs)
    if isinstance(first, dict):
        return {k: combine_leaves([o[k] for o in outs], fn) for k in first}
    items = [combine_leaves([o[i] for o in outs], fn) for i in range(len(first))]
    if isinstance(first, list):
        return items
    if hasattr(first, "_fields"):  # a namedtuple
        return type(first)(*items)
    return tuple(items)


def call_without_side_effects(module: Any, fn: Callable[[], Any]) -> Any:
    """`fn()` under no_grad with the module's buffers restored afterwards: a member in train mode would
    otherwise update its BatchNorm statistics while it is only being checked."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        with torch.no_grad():
            return fn()
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)


# ------------------------------------------------------------------------------------- architectures


def short_list(keys: Any, limit: int = 8) -> str:
    keys = list(keys)
    if len(keys) <= limit:
        return repr(keys)
    return repr(keys[:limit])[:-1] + f", ... ({len(keys)} in all)]"


def check_same_architecture(state_dicts: list[dict[str, Any]], names: list[str], method: str = "merge") -> None:
    """Identical parameter names, shapes and floating-ness in every member.

    Names present in one member only are listed; otherwise the first mismatching parameter (in the first
    member's order) is named with both shapes.
    """
    sd0, n0 = state_dicts[0], names[0]
    keys0 = list(sd0)
    set0 = set(keys0)
    for sd, n in zip(state_dicts[1:], names[1:]):
        only0 = [k for k in keys0 if k not in sd]
        only1 = [k for k in sd if k not in set0]
        if only0 or only1:
            raise FusionError(f"{method}: architecture mismatch between {n0!r} and {n!r}: only in {n0!r}: "
                              f"{short_list(only0)}; only in {n!r}: {short_list(only1)}")
    for k in keys0:
        t0 = sd0[k]
        for sd, n in zip(state_dicts[1:], names[1:]):
            t = sd[k]
            if t.shape != t0.shape:
                raise FusionError(f"{method}: architecture mismatch: parameter {k!r} has shape {tensor_shape(t0)} "
                                  f"in {n0!r} but {tensor_shape(t)} in {n!r}")
            if t.is_floating_point() != t0.is_floating_point():
                raise FusionError(f"{method}: architecture mismatch: parameter {k!r} has dtype {t0.dtype} in "
                                  f"{n0!r} but {t.dtype} in {n!r}")
