"""First-divergence localisation, the format-free part: when parity fails, name the first operator whose values
leave the source's.

Given pairs of (fx node, the artifact's tensor for it), in the source graph's execution order, the search runs the
source's ExportedProgram node by node (a torch.fx Interpreter) on the failing sample and compares each pair with the
job's tolerance (the same rules as output parity); the first that fails is `first_divergence`. The formats build the
pairs: ONNX in `portq.tasks.formats.onnx.localise` (by the fx names the dynamo exporter records, else by value),
pt2 here (`localise_pt2`: fx node against fx node, given a builder of the source's program). TorchScript and
AOTInductor artifacts expose no intermediate values and are not localised; the report's `localisation` says so.
Localisation is a diagnosis: it never fails the job. This module never imports a format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from portq.tasks.checks.evidence import SourceEvidence
from portq.tasks.core.contract import Divergence, ParityReport, Tolerance
from portq.tasks.core.errors import first_line


@dataclass
class Candidate:
    """One intermediate tensor the artifact exposes, and what it came from."""

    fx_name: str
    value: str  # the artifact's tensor name
    node: str  # the artifact's node producing it
    op_type: str
    target: str | None = None
    module: str | None = None
    module_class: str | None = None


def localise_pt2(source_program: Callable[[], Any], path: Path, ev: SourceEvidence, parity: ParityReport,
                 tol: Tolerance) -> tuple[Divergence | None, str]:
    """The pt2 format's localisation: fx node against fx node. `source_program()` builds the source's program the
    way the export routes do."""
    return never_raises(_localise_pt2, source_program, path, ev, parity, tol)


def never_raises(search: Any, *args: Any) -> tuple[Divergence | None, str]:
    try:
        return search(*args)  # type: ignore[no-any-return]
    except Exception as e:  # a diagnosis that fails must not fail the artifact
        return None, f"localisation failed: {type(e).__name__}: {first_line(e)}"


def values_on_failing_sample(programs: Sequence[Any], ev: SourceEvidence,
                             parity: ParityReport) -> tuple[int, list[tuple[dict[str, np.ndarray], list[str]]]]:
    """Run each program node by node on the sample to localise on: the first on which a failing output failed,
    else the first sample (a program specialised to the first sample's shapes cannot run the others)."""
    index = failing_sample(parity)
    try:
        return index, [fx_values(p, ev.samples[index], ev.device) for p in programs]
    except Exception:
        if index == 0:
            raise
        return 0, [fx_values(p, ev.samples[0], ev.device) for p in programs]


def failing_sample(parity: ParityReport) -> int:
    """The sample to localise on: the first on which a failing output failed."""
    for o in parity.outputs:
        if not o.passed and o.first_failing_sample is not None:
            return o.first_failing_sample
    return 0


# ------------------------------------------------------------------------------------------------ fx side


def fx_values(program: Any, sample: list[np.ndarray], device: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every tensor an ExportedProgram computes on `sample`, by fx node name, and the nodes in execution order."""
    import torch
    from torch.export.graph_signature import InputKind

    users = iter(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in sample)
    flat: list[Any] = []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            flat.append(next(users))
        elif spec.target in program.state_dict:
            flat.append(program.state_dict[spec.target].to(device))
        elif spec.target in program.constants:
            value = program.constants[spec.target]
            flat.append(value.to(device) if isinstance(value, torch.Tensor) else value)
        else:
            raise ValueError(f"input {spec.arg.name} ({spec.kind.name}) has no value in the program")
    values: dict[str, np.ndarray] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if n.op == "call_function" and isinstance(out, torch.Tensor):
                t = out.detach()
                values[n.name] = (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()
            return out

    with torch.no_grad():
        Recorder(program.graph_module).run(*flat)
    order = [n.name for n in program.graph.nodes if n.name in values]
    return values, order


def module_of(node: Any) -> tuple[str | None, str | None]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None, None
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return (path or None), cls_name


def target_name(node: Any) -> str | None:
    target = getattr(node, "target", None)
    if target is None or isinstance(target, str):
        return None
    # OpOverloads print as aten.linear.default; Python callables (operator.getitem) by their name
    return str(target) if hasattr(target, "_schema") else getattr(target, "__name__", str(target))


def _localise_pt2(source_program: Callable[[], Any], path: Path, ev: SourceEvidence, parity: ParityReport,
                  tol: Tolerance) -> tuple[Divergence | None, str]:
    import torch

    artifact = torch.export.load(str(path))
    source = source_program()
    index, [(ref, order), (act, _)] = values_on_failing_sample([source, artifact], ev, parity)
    nodes = {n.name: n for n in artifact.graph.nodes}
    pairs = []
    for name in order:
        if name in act and name in nodes:
            module, cls = module_of(nodes[name])
            cand = Candidate(fx_name=name, value=name, node=name, op_type=str(nodes[name].target),
                             target=target_name(nodes[name]), module=module, module_class=cls)
            pairs.append((name, cand, ref[name], act[name]))
    return first_failing(pairs, source, parity, tol, index, "pt2")


def first_failing(pairs: Sequence[tuple[str, Candidate, np.ndarray, np.ndarray | None]], program: Any,
                   parity: ParityReport, tol: Tolerance, sample: int, kind: str) -> tuple[Divergence | None, str]:
    from portq.tasks.checks.parity import compare

    # intermediates are judged by the job's tolerance, without the per-output overrides meant for outputs
    job_tol = tol.model_copy(update={"outputs": {}})
    fx_nodes = {n.name: n for n in program.graph.nodes}
    compared = 0
    for fx_name, cand, ref, act in pairs:
        if act is None or act.shape != ref.shape:
            continue
        fx_target = target_name(fx_nodes[fx_name]) if fx_name in fx_nodes else None
        if cand.target and fx_target and cand.target != fx_target:
            continue  # the same name for another operator: the graphs differ here, so this pair proves nothing
        compared += 1
        rep = compare([[(cand.value, ref)]], [[(cand.value, act)]], job_tol, seed=0, device="",
                      precision=parity.precision)
        if rep.passed:
            continue
        out = rep.outputs[0]
        fx_node = fx_nodes.get(fx_name)
        module, module_class = cand.module, cand.module_class
        if module is None and fx_node is not None:
            module, module_class = module_of(fx_node)
        target = cand.target or (target_name(fx_node) if fx_node is not None else None)
        return Divergence(node=cand.node, op_type=cand.op_type, source_node=fx_name, target=target, module=module,
                          module_class=module_class, value=cand.value, shape=list(ref.shape),
                          max_abs_err=out.max_abs_err, max_rel_err=out.max_rel_err, mean_abs_err=out.mean_abs_err,
                          sample=sample, compared=compared), (
            f"compared {compared} intermediate value(s) of the {kind} artifact with the source's fx graph on "
            f"sample {sample}, in execution order; the first beyond tolerance is named")
    return None, (f"no intermediate value of the {kind} artifact exceeds the tolerance ({compared} compared on "
                  f"sample {sample}): the error accumulates gradually rather than at one operator")



def close(ref: np.ndarray, act: np.ndarray, atol: float, rtol: float) -> bool:
    """The elementwise parity rule on one pair of tensors (NaN matches NaN, Inf the same Inf)."""
    from portq.tasks.checks.output_check import elementwise_errors

    if ref.shape != act.shape:
        return False
    if ref.size == 0:
        return True
    abs_err, rel_err, mismatched = elementwise_errors(act, ref)
    return not bool((((abs_err > atol) & (rel_err > rtol)) | mismatched).any())


