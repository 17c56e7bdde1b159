"""TorchScript traces that baked a loop over a data-dependent tensor: found at load, refused with what to do.

Mixture-of-experts blocks are the usual case. The Hugging Face "loop over every expert" block (router ->
softmax -> top-k -> per expert `torch.where(one_hot mask)` -> `index_add_`) traces into a shape-generic
archive (`aten::where` and `aten::index_add_` are recorded as ops) and converts like any model. Formulations
that iterate over a tensor whose length depends on the data do not: the newer Hugging Face loop
`for e in (mask.sum(...) > 0).nonzero(): self.experts[e]`, DeepSeek's `tokens_per_expert` loop, or
`x.split(counts.tolist())`. torch.export refuses them (GuardOnDataDependentSymNode), and torch.jit.trace unrolls
them for the tracing example: the archive runs only the experts that example routed to, in that number, for
every input (another number crashes with "Expected N elements in a list", the same number silently skips
experts). The archive is wrong before any exporter sees it, so portq refuses it at load with
`BAKED_LOOP_MESSAGE` rather than convert a wrong model; a dense rewrite is impossible, since the trace no
longer holds the experts it skipped.

Plain torch only (no portq imports).
"""

from __future__ import annotations

from typing import Any

BAKED_LOOP_CAUSE = (
    "the TorchScript archive was traced through a loop over a data-dependent tensor ({where}): torch.jit.trace "
    "unrolled it for the tracing example (e.g. only the experts that example routed to), so the archive computes "
    "the wrong thing, or fails, for other inputs")
BAKED_LOOP_HINT = (
    "re-trace a version that loops over every expert (for i in range(num_experts): idx, top = "
    "torch.where(mask[i]) ...), or submit the model as a state dict with --arch")

#: ops whose output length depends on tensor values
_DATA_DEPENDENT = ("aten::nonzero", "aten::argwhere", "aten::unique_consecutive", "aten::_unique2",
                   "aten::masked_select", "aten::nonzero_static")
#: ops that keep the leading (data-dependent) dim of their input
_PASS_THROUGH = ("aten::squeeze", "aten::view", "aten::reshape", "aten::to", "aten::flatten", "aten::contiguous",
                 "aten::clone", "aten::detach", "aten::t", "aten::mul", "aten::add")


def _from_data_dependent(value: Any, depth: int = 0) -> str | None:
    node = value.node()
    if node.kind() in _DATA_DEPENDENT:
        return node.kind()
    if depth < 6 and node.kind() in _PASS_THROUGH and node.inputsSize():
        return _from_data_dependent(node.inputsAt(0), depth + 1)
    return None


def baked_data_dependent_loops(script: Any) -> list[str]:
    """Places where a data-dependent-length tensor is unpacked into a fixed number of values (a Python loop over
    it, unrolled by the tracer). Empty for archives that stay shape-generic."""
    graph = script.inlined_graph
    found = []
    for kind in ("aten::unbind", "aten::split", "aten::split_with_sizes", "aten::chunk"):
        for node in graph.findAllNodes(kind):
            dim = node.inputsAt(1).toIValue() if kind == "aten::unbind" else None
            source = _from_data_dependent(node.inputsAt(0))
            if source is None:
                continue
            if kind == "aten::unbind" and dim not in (0, None):
                continue
            unpacked = [u.user for u in node.output().uses() if u.user.kind() == "prim::ListUnpack"]
            count = len(list(unpacked[0].outputs())) if unpacked else "a fixed number of"
            found.append(f"{kind} of the result of {source}, unpacked into {count} values")
    return found
