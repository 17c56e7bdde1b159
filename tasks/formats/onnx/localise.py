"""First-divergence localisation of ONNX artifacts (the format-free search is `portq.tasks.checks.divergence`).

ONNX artifacts made by the dynamo exporter (routes `dynamo` and `ts2ep`) record, on every node, the
torch.fx node it implements (`pkg.torch.onnx.fx_node`), the submodule path (`pkg.torch.onnx.name_scopes`)
and the module classes (`pkg.torch.onnx.class_hierarchy`); their tensors are named after the fx nodes. The
search:

1. export the source again in memory, the same way (deterministic), to get the exporter's
   ExportedProgram: the graph those fx names refer to;
2. run that program node by node (a torch.fx Interpreter) on the failing sample and keep every tensor;
3. run the artifact itself in onnxruntime, on the same device, with every matched tensor added as a graph
   output;
4. walk the fx graph in execution order and compare each matched tensor with the job's tolerance (the same
   rules as output parity); the first that fails is `first_divergence`.

ONNX from the TorchScript-based exporter keeps no fx names: its tensors are matched to the source's fx
values by value instead, and the first source operator whose inputs match but whose output (and users)
do not is named, with the ONNX node that consumes those inputs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from portq.tasks.checks.divergence import (
    Candidate,
    close,
    first_failing,
    module_of,
    never_raises,
    target_name,
    values_on_failing_sample,
)
from portq.tasks.checks.evidence import SourceEvidence
from portq.tasks.core.contract import Divergence, ParityReport, Tolerance
from portq.tasks.formats import exporter_cache
from portq.tasks.formats.localise import export_inputs, source_program
from portq.tasks.formats.onnx.export import DEFAULT_OPSET, onnx_opset

_FX_NAME = re.compile(r"^\s*%([\w.]+)\s*:")
META_FX = "pkg.torch.onnx.fx_node"
META_SCOPES = "pkg.torch.onnx.name_scopes"
META_CLASSES = "pkg.torch.onnx.class_hierarchy"



def localise_onnx(source: Any, path: Path, runner: Any, ev: SourceEvidence, parity: ParityReport,
                  tol: Tolerance) -> tuple[Divergence | None, str]:
    """The ONNX format's localisation hook: by fx names where the exporter kept them, else by value."""
    return never_raises(_localise_onnx, source, path, runner, ev, parity, tol)



# ---------------------------------------------------------------------------------------------- onnx side


def onnx_candidates(model_proto: Any) -> dict[str, Candidate]:
    """fx node name -> the artifact's tensor holding that node's value, from the exporter's node metadata."""
    groups: dict[str, list[Any]] = {}
    for node in model_proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        m = _FX_NAME.match(meta.get(META_FX, ""))
        if m:
            groups.setdefault(m.group(1), []).append((node, meta))
    found: dict[str, Candidate] = {}
    for fx_name, members in groups.items():
        # the tensor named after the fx node; else (a renamed graph output) the group's last node's output
        hit = next(((n, meta, o) for n, meta in members for o in n.output if o == fx_name), None)
        if hit is None:
            n, meta = members[-1]
            if not n.output or not n.output[0]:
                continue
            hit = (n, meta, n.output[0])
        node, meta, value = hit
        scopes = _literal_list(meta.get(META_SCOPES))
        classes = _literal_list(meta.get(META_CLASSES))
        module = next((s for s in reversed(scopes[:-1]) if s), None) if len(scopes) > 1 else None
        module_class = classes[-2] if len(classes) >= 2 and module else None
        found[fx_name] = Candidate(fx_name=fx_name, value=value, node=node.name or value, op_type=node.op_type,
                                   target=classes[-1] if classes else None, module=module, module_class=module_class)
    return found


def _literal_list(text: str | None) -> list[str]:
    import ast

    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def _onnx_intermediates(path: Path, names: list[str], sample_feed: dict[str, np.ndarray],
                        providers: list[str]) -> dict[str, np.ndarray]:
    """Run the artifact with `names` exposed as extra outputs."""
    import onnx
    import onnxruntime as ort

    # The graph only: its weights may be external (model.onnx.data, past 2 GB no protobuf holds them), so the
    # widened graph is saved beside the artifact, where its relative references to them still hold.
    proto = onnx.load(str(path), load_external_data=False)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    widened = path.parent / f".localise-{os.getpid()}-{path.name}"
    try:
        onnx.save(proto, str(widened))
        session = ort.InferenceSession(str(widened), options, providers=providers)
    finally:
        widened.unlink(missing_ok=True)
    out_names = [o.name for o in session.get_outputs()]
    feed = {k: v for k, v in sample_feed.items() if k in {i.name for i in session.get_inputs()}}
    results = session.run(None, feed)
    return {n: np.asarray(v) for n, v in zip(out_names, results) if n in set(names)}


def _reexport(model: Any, ev: SourceEvidence, opset: int | None) -> Any:
    """The dynamo exporter's ExportedProgram for this source (the graph the artifact's fx names refer to)."""
    import torch

    args, _ = export_inputs(ev)
    exporter_cache.install()
    onnx_program = torch.onnx.export(source_program(model, ev), args, dynamo=True, opset_version=opset,
                                     input_names=ev.input_names, output_names=ev.output_names, verbose=False)
    assert onnx_program is not None  # dynamo=True always returns the program
    return onnx_program.exported_program


def _localise_onnx(model: Any, path: Path, runner: Any, ev: SourceEvidence, parity: ParityReport,
                   tol: Tolerance) -> tuple[Divergence | None, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    candidates = onnx_candidates(proto)
    if not candidates:
        return _localise_onnx_by_values(model, path, proto, runner, ev, parity, tol)
    opset = onnx_opset(proto) or DEFAULT_OPSET
    program = _reexport(model, ev, opset)
    index, [(values, order)] = values_on_failing_sample([program], ev, parity)
    names = [candidates[n].value for n in order if n in candidates]
    feed = runner.prepare(ev.samples[index]) if hasattr(runner, "prepare") else {}
    providers = list(getattr(runner, "providers", None) or ["CPUExecutionProvider"])
    actual = _onnx_intermediates(path, names, feed, providers)
    pairs = [(n, candidates[n], values[n], actual.get(candidates[n].value)) for n in order if n in candidates]
    return first_failing(pairs, program, parity, tol, index, "onnx")



# ------------------------------------------------------------------ onnx without metadata: match by value


def _scope_module(onnx_node_name: str) -> str | None:
    """'/net/net.2/Gemm' (TorchScript-based exporter scopes) -> 'net.2'."""
    parts = [p for p in onnx_node_name.split("/") if p]
    return parts[-2] if len(parts) >= 2 else None


def _localise_onnx_by_values(model: Any, path: Path, proto: Any, runner: Any, ev: SourceEvidence, parity: ParityReport,
                             tol: Tolerance) -> tuple[Divergence | None, str]:
    """ONNX without fx metadata (the TorchScript-based exporter): match the artifact's tensors to the source's
    fx values by value, then name the first source operator whose inputs are matched but whose output is
    not, and whose users are not matched either (so a step the artifact merely fused away is not blamed).
    """
    from portq.tasks.checks.parity import compare
    from portq.tasks.checks.tolerances import resolve

    program = source_program(model, ev)
    index, [(values, order)] = values_on_failing_sample([program], ev, parity)
    onnx_order = [o for n in proto.graph.node for o in n.output if o]
    feed = runner.prepare(ev.samples[index]) if hasattr(runner, "prepare") else {}
    providers = list(getattr(runner, "providers", None) or ["CPUExecutionProvider"])
    actual = _onnx_intermediates(path, onnx_order, feed, providers)
    job = resolve(tol.model_copy(update={"outputs": {}}), parity.precision, "")
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in onnx_order:
        if name in actual:
            by_shape.setdefault(tuple(actual[name].shape), []).append(name)
    matched: dict[str, str] = {}
    for fx in order:
        for name in by_shape.get(tuple(values[fx].shape), []):
            if close(values[fx], actual[name], job.atol, job.rtol):
                matched[fx] = name
                break
    fx_nodes = {n.name: n for n in program.graph.nodes}
    used = set(matched.values())
    graph_inputs = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer}
    for fx in order:
        node = fx_nodes[fx]
        if fx in matched:
            continue
        computed_inputs = [a.name for a in node.all_input_nodes if a.name in values]
        if any(i not in matched for i in computed_inputs):
            continue  # downstream of an earlier mismatch, not its origin
        if any(u.name in matched for u in node.users):
            continue  # a step the artifact fused away: its result reappears downstream
        feeds = {matched[i] for i in computed_inputs} or graph_inputs
        shape = tuple(values[fx].shape)
        hit = next(((n, o) for n in proto.graph.node if feeds & set(n.input)
                    for o in n.output if o in actual and o not in used and tuple(actual[o].shape) == shape), None)
        module, module_class = module_of(node)
        if hit is None:
            return None, (f"compared the artifact's tensors with the source's fx values on sample {index}: fx node "
                          f"{fx} ({target_name(node)}) is the first whose value the artifact never computes, but "
                          "no ONNX node could be tied to it")
        onnx_node, value = hit
        rep = compare([[(value, values[fx])]], [[(value, actual[value])]],
                      tol.model_copy(update={"outputs": {}}), seed=0, device="", precision=parity.precision)
        out = rep.outputs[0]
        return Divergence(node=onnx_node.name or value, op_type=onnx_node.op_type, source_node=fx,
                          target=target_name(node), module=module or _scope_module(onnx_node.name),
                          module_class=module_class if module else None, value=value, shape=list(shape),
                          max_abs_err=out.max_abs_err, max_rel_err=out.max_rel_err, mean_abs_err=out.mean_abs_err,
                          sample=index, compared=len(matched) + 1), (
            f"the ONNX file carries no fx metadata (TorchScript-based exporter): matched {len(matched)} of its "
            f"tensors to the source's fx values by value on sample {index}; named the first source operator "
            "whose inputs match and whose output does not")
    return None, (f"no origin found: {len(matched)} of {len(order)} source values matched the artifact's tensors "
                  f"on sample {index}")
