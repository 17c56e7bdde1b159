"""Output-space fusion in plain torch: one module that calls every member and combines their outputs, so
the members export as a single graph in every format.

- ensemble: the weighted mean of the members' outputs, leaf by leaf (nested outputs keep their structure);
- vote: a weighted majority of the members' argmax, returned as int64 class indices (N,);
- concat / stack: the outputs concatenated along the last dim, or stacked along a new dim 1 (0 on request);
- chain: each member's output is the next member's input (a tuple is unpacked, a dict passed by keyword).

portq builds fused models with this code and every reproduce script of a fused artifact carries a copy, so
it imports only torch and numpy (and the other plain fusion modules, whose imports a script drops: it holds
them all in one file). `check_outputs` runs each member once on example inputs and refuses
incompatible outputs with a message that names the members and shapes; `build_output_fusion` builds the
module without running anything (a reproduce script rebuilds what portq checked).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from portq.tasks.fusion.validation import (
    FusionError,
    as_args,
    call_without_side_effects,
    check_weights,
    combine_leaves,
    describe_shapes,
    error_line,
    named_members,
    output_leaves,
    output_structure,
    tensor_shape,
)
from torch import nn

VOTE_TIE_TOL = 1e-6  # votes are shares of the total (normalised) weight: rounding stays far below this
TIE_BREAKS = ("probability", "lowest-index")


def _numpy_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _numpy_vote(outs: list[np.ndarray], weights: list[float], tie_break: str) -> np.ndarray:
    """The documented vote, written again over numpy arrays: weighted argmax counts, ties within the
    tolerance broken by the summed probability (or the lowest index), then the lowest index."""
    n, c = outs[0].shape
    votes = np.zeros((n, c))
    probs = np.zeros((n, c))
    for w, out in zip(weights, outs):
        votes[np.arange(n), out.argmax(axis=1)] += w
        probs += w * _numpy_softmax(out.astype(np.float64))
    tied = votes >= votes.max(axis=1, keepdims=True) - VOTE_TIE_TOL
    key = np.where(tied, probs, -np.inf) if tie_break == "probability" else tied.astype(np.float64)
    return key.argmax(axis=1).astype(np.int64)


class OutputFusion(nn.Module):
    """Members that all take the same inputs; each subclass is one method (`method`, its name in
    `portq.tasks.fusion.methods`) and says how its members' outputs combine: `forward` in torch, `reference`
    again in numpy float64 (the report's check that the fused graph computes what its members do together),
    `check` which outputs it refuses, `build` the module from the method's parameters as applied (every one
    given: the defaults are the method's config's, in `portq.tasks.fusion.methods`, and nowhere else)."""

    method = ""
    #: each member's output is the next member's input (nothing to combine outside the graph)
    hands_over = False

    @classmethod
    def build(cls, members: list[Any], names: list[str], params: dict[str, Any]) -> OutputFusion:
        return cls(members, names)

    @classmethod
    def check(cls, names: list[str], members: list[Any], args: tuple[Any, ...], params: dict[str, Any]) -> None:
        """Run every member once on `args` and refuse outputs this method cannot combine."""
        outs = _run_members(cls.method, names, members, args)
        _same_structure(cls.method, names, outs)
        cls.check_leaves(names, outs, params)

    @classmethod
    def check_leaves(cls, names: list[str], outs: list[Any], params: dict[str, Any]) -> None:
        pass

    def reference(self, leaves: list[list[np.ndarray]]) -> tuple[list[np.ndarray], str]:
        """The members' flattened outputs (float64, per member) combined in numpy, and how."""
        raise NotImplementedError(self.method)

    def __init__(self, members: list[Any], names: list[str]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.member_names = list(names)
        self.training = False

    def train(self, mode: bool = True) -> OutputFusion:
        # Own flag only: an ExportedProgram's module refuses train(), and exporters call train(False) on the
        # module they export. Fine-tuning sets the members' modes itself (training.set_training).
        self.training = mode
        return self


class Ensemble(OutputFusion):
    """The weighted mean of the members' outputs, leaf by leaf; the weights sum to 1."""

    method = "ensemble"

    @classmethod
    def build(cls, members: list[Any], names: list[str], params: dict[str, Any]) -> OutputFusion:
        return cls(members, names, check_weights(params.get("weights"), len(members), cls.method))

    @classmethod
    def check_leaves(cls, names: list[str], outs: list[Any], params: dict[str, Any]) -> None:
        _floating(cls.method, names, outs)
        _leaf_shapes(cls.method, names, outs, lambda a, b: a.shape == b.shape, "ensemble needs identical output "
                     "shapes")

    def reference(self, leaves: list[list[np.ndarray]]) -> tuple[list[np.ndarray], str]:
        combined = [sum(w * member[j] for w, member in zip(self.weights, leaves)) for j in range(len(leaves[0]))]
        return combined, f"the weighted mean in numpy float64 (weights {[round(x, 6) for x in self.weights]})"

    def __init__(self, members: list[Any], names: list[str], weights: list[float]) -> None:
        super().__init__(members, names)
        self.weights = [float(w) for w in weights]

    def _mean(self, leaves: list[Any]) -> Any:
        acc = leaves[0] * self.weights[0]
        for w, x in zip(self.weights[1:], leaves[1:]):
            acc = acc + x * w
        return acc

    def forward(self, *args: Any) -> Any:
        return combine_leaves([m(*args) for m in self.members], self._mean)


class Vote(OutputFusion):
    """A weighted majority of the members' argmax over (N, C) scores; int64 class indices (N,).

    Classes whose vote share is within VOTE_TIE_TOL of the largest are tied. With tie_break "probability"
    (the default) the tied class with the highest summed (weighted) member softmax wins; with "lowest-index"
    the lowest class index. A tie that remains goes to the lowest index: argmax returns the first maximum in
    torch and in ONNX. No data-dependent Python control flow, so it exports as one graph.
    """

    method = "vote"

    @classmethod
    def build(cls, members: list[Any], names: list[str], params: dict[str, Any]) -> OutputFusion:
        tie_break = params["tie_break"]
        if tie_break not in TIE_BREAKS:
            raise FusionError(f"vote: tie_break must be 'probability' or 'lowest-index', got {tie_break!r}")
        return cls(members, names, check_weights(params.get("weights"), len(members), cls.method), tie_break)

    @classmethod
    def check(cls, names: list[str], members: list[Any], args: tuple[Any, ...], params: dict[str, Any]) -> None:
        _check_vote(names, _run_members(cls.method, names, members, args))

    def reference(self, leaves: list[list[np.ndarray]]) -> tuple[list[np.ndarray], str]:
        return [_numpy_vote([m[0] for m in leaves], self.weights, self.tie_break)], \
            f"a majority vote in numpy (tie break: {self.tie_break})"

    def __init__(self, members: list[Any], names: list[str], weights: list[float], tie_break: str,
                 outputs_are_logits: bool = True) -> None:
        super().__init__(members, names)
        self.weights = [float(w) for w in weights]
        self.tie_break = tie_break
        self.outputs_are_logits = bool(outputs_are_logits)

    def forward(self, *args: Any) -> Any:
        votes: Any = None
        probs: Any = None
        for w, m in zip(self.weights, self.members):
            out = m(*args)
            classes = torch.arange(out.shape[1], device=out.device)
            onehot = (out.argmax(dim=1).unsqueeze(1) == classes.unsqueeze(0)).to(out.dtype)
            votes = onehot * w if votes is None else votes + onehot * w
            if self.tie_break == "probability":
                p = (out.softmax(dim=1) if self.outputs_are_logits else out) * w
                probs = p if probs is None else probs + p
        tied = votes >= votes.amax(dim=1, keepdim=True) - VOTE_TIE_TOL
        if self.tie_break == "probability":
            key = torch.where(tied, probs, torch.full_like(probs, float("-inf")))
        else:
            key = tied.to(votes.dtype)
        return key.argmax(dim=1)


class Concat(OutputFusion):
    """The members' outputs concatenated along the last dim, leaf by leaf."""

    method = "concat"

    @classmethod
    def check_leaves(cls, names: list[str], outs: list[Any], params: dict[str, Any]) -> None:
        _leaf_shapes(cls.method, names, outs, lambda a, b: a.dim() == b.dim() and a.dim() >= 1
                     and a.shape[:-1] == b.shape[:-1],
                     "concat along the last dim needs the same rank and all other dims equal")

    def reference(self, leaves: list[list[np.ndarray]]) -> tuple[list[np.ndarray], str]:
        return [np.concatenate([m[j] for m in leaves], axis=-1) for j in range(len(leaves[0]))], \
            "concatenated along the last dim in numpy"

    def forward(self, *args: Any) -> Any:
        return combine_leaves([m(*args) for m in self.members], lambda xs: torch.cat(xs, dim=-1))


class Stack(OutputFusion):
    """The members' outputs stacked along a new dim: 1 by default, (N, M, ...), so the batch stays dim 0."""

    method = "stack"

    @classmethod
    def build(cls, members: list[Any], names: list[str], params: dict[str, Any]) -> OutputFusion:
        dim = params["dim"]
        if dim not in (0, 1):
            raise FusionError(f"stack: dim must be 0 or 1, got {dim!r}")
        return cls(members, names, dim)

    @classmethod
    def check_leaves(cls, names: list[str], outs: list[Any], params: dict[str, Any]) -> None:
        dim = int(params["dim"])
        for n, o in zip(names, outs):
            for path, t in output_leaves(o):
                if t.dim() < dim:
                    raise FusionError(f"stack: member {n!r} output{path} has shape {tensor_shape(t)}; cannot "
                                      f"stack along dim {dim}")
        _leaf_shapes(cls.method, names, outs, lambda a, b: a.shape == b.shape, "stack needs identical output shapes")

    def reference(self, leaves: list[list[np.ndarray]]) -> tuple[list[np.ndarray], str]:
        return [np.stack([m[j] for m in leaves], axis=self.dim) for j in range(len(leaves[0]))], \
            f"stacked along dim {self.dim} in numpy"

    def __init__(self, members: list[Any], names: list[str], dim: int) -> None:
        super().__init__(members, names)
        self.dim = int(dim)

    def forward(self, *args: Any) -> Any:
        return combine_leaves([m(*args) for m in self.members], lambda xs: torch.stack(xs, dim=self.dim))


def call_next(module: Any, out: Any) -> Any:
    """A chain's hand-over: a tensor is the next member's one argument, a tuple or list its positional
    arguments, a dict its keyword arguments."""
    if isinstance(out, torch.Tensor):
        return module(out)
    if isinstance(out, dict):
        return module(**out)
    return module(*out)


class Chain(OutputFusion):
    """members[0](*inputs), then each next member on the previous one's output."""

    method = "chain"
    hands_over = True

    @classmethod
    def check(cls, names: list[str], members: list[Any], args: tuple[Any, ...], params: dict[str, Any]) -> None:
        _check_chain(names, members, args)

    def forward(self, *args: Any) -> Any:
        out = self.members[0](*args)
        for m in self.members[1:]:
            out = call_next(m, out)
        return out


def with_input_names(module: OutputFusion, input_names: list[str]) -> OutputFusion:
    """Give the fused module's `forward(*args)` the members' signature, `forward(x, mask)`.

    Exporters read the signature: torch.export matches dynamic_shapes to its parameters and names the
    graph's inputs after them, so portq's dynamic dims and input names work as for any model. The module's
    class becomes a subclass of its own with that signature; names that are not identifiers become x0, x1...
    """
    names: list[str] = []
    for i, n in enumerate(input_names):
        ok = isinstance(n, str) and n.isidentifier() and not n.startswith("__") and n not in names and n != "self"
        names.append(n if ok else f"x{i}")
    parameter = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature([inspect.Parameter("self", parameter),
                                   *(inspect.Parameter(n, parameter) for n in names)])
    combine = type(module).forward

    def forward(self: Any, *args: Any) -> Any:
        return combine(self, *args)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    cls = type(type(module).__name__, (type(module),), {"forward": forward, "__module__": type(module).__module__})
    module.__class__ = cls
    return module


# ----------------------------------------------------------------------------------------- checks and builds


def _run_members(method: str, names: list[str], items: list[Any], args: tuple[Any, ...]) -> list[Any]:
    outs = []
    for n, m in zip(names, items):
        try:
            out = call_without_side_effects(m, lambda m=m: m(*args))
        except Exception as e:  # re-raised with the member and the input shapes
            shapes = tuple(tensor_shape(a) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
            raise FusionError(f"{method}: member {n!r} failed on the example inputs with shapes {shapes}: "
                              f"{error_line(e)}") from e
        try:
            output_leaves(out)
        except FusionError as e:
            raise FusionError(f"{method}: member {n!r}: {e}") from None
        outs.append(out)
    return outs


def _same_structure(method: str, names: list[str], outs: list[Any]) -> None:
    s0 = output_structure(outs[0])
    for n, o in zip(names[1:], outs[1:]):
        s = output_structure(o)
        if s != s0:
            raise FusionError(f"{method}: member {n!r} returns {s} but member {names[0]!r} returns {s0}; members "
                              "must return the same output structure")


def _leaf_shapes(method: str, names: list[str], outs: list[Any], compatible: Any, requirement: str) -> None:
    leaves0 = output_leaves(outs[0])
    for n, o in zip(names[1:], outs[1:]):
        for (path, t0), (_, t) in zip(leaves0, output_leaves(o)):
            if not compatible(t0, t):
                raise FusionError(f"{method}: member {n!r} output{path} has shape {tensor_shape(t)} but member "
                                  f"{names[0]!r} output{path} has shape {tensor_shape(t0)}; {requirement}")


def _floating(method: str, names: list[str], outs: list[Any]) -> None:
    for n, o in zip(names, outs):
        for path, t in output_leaves(o):
            if not t.is_floating_point():
                raise FusionError(f"{method}: member {n!r} output{path} has dtype {t.dtype}; {method} needs "
                                  "floating-point outputs")


def _check_vote(names: list[str], outs: list[Any]) -> None:
    for n, o in zip(names, outs):
        if not isinstance(o, torch.Tensor):
            raise FusionError(f"vote: member {n!r} returns {output_structure(o)}; vote needs a single (N, C) tensor")
        if o.dim() != 2:
            raise FusionError(f"vote: member {n!r} output has shape {tensor_shape(o)}; vote needs (N, C) class "
                              "scores")
        if not o.is_floating_point():
            raise FusionError(f"vote: member {n!r} output has dtype {o.dtype}; vote needs floating-point scores")
    _leaf_shapes("vote", names, outs, lambda a, b: a.shape == b.shape,
                 "vote needs the same (N, C) output shape from every member")


def _check_chain(names: list[str], items: list[Any], args: tuple[Any, ...]) -> None:
    out = _run_members("chain", names[:1], items[:1], args)[0]
    for i in range(1, len(items)):
        prev, cur, m = names[i - 1], names[i], items[i]
        try:
            nxt = call_without_side_effects(m, lambda m=m, out=out: call_next(m, out))
        except Exception as e:  # re-raised with both members and the shapes handed over
            raise FusionError(f"chain: output of member {prev!r} has shape {describe_shapes(out)}, which member "
                              f"{cur!r} cannot accept: {error_line(e)}") from e
        try:
            output_leaves(nxt)
        except FusionError as e:
            raise FusionError(f"chain: member {cur!r}: {e}") from None
        out = nxt


def fusion_class(method: str) -> type[OutputFusion]:
    """The OutputFusion subclass that implements `method`."""
    for cls in OutputFusion.__subclasses__():
        if cls.method == method:
            return cls
    raise FusionError(f"{method} is not an output-space fusion method")


def check_outputs(method: str, members: Any, example_inputs: Any, params: dict[str, Any] | None = None,
                  names: list[str] | None = None) -> None:
    """Run every member once on `example_inputs` and refuse outputs `method` cannot combine."""
    names, items = named_members(members, names, method)
    for n, m in zip(names, items):
        if not isinstance(m, nn.Module):
            raise FusionError(f"{method}: member {n!r} is not a torch.nn.Module (got {type(m).__name__})")
    args = as_args(example_inputs, f"{method}: example inputs")
    fusion_class(method).check(names, items, args, params or {})


def build_output_fusion(method: str, members: Any, params: dict[str, Any] | None = None,
                        names: list[str] | None = None) -> OutputFusion:
    """The fused module (eval mode); it holds the members themselves, not copies."""
    names, items = named_members(members, names, method)
    return fusion_class(method).build(items, names, params or {}).eval()
