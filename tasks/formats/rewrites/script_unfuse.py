"""TorchScript graph passes that rewrite PyTorch's fused transformer fast paths into plain ATen ops.

A TorchScript archive traced from `nn.TransformerEncoder(Layer)` / `nn.MultiheadAttention` / `nn.Transformer` in
eval mode under no_grad records the inference fast paths:

  aten::_transformer_encoder_layer_fwd   one whole encoder layer (attention + FFN + two LayerNorms)
  aten::_native_multi_head_attention     one self-attention block (packed in-projection, merged mask)
  aten::_nested_tensor_from_mask         TransformerEncoder's "sparsity" path (enable_nested_tensor=True with a
  aten::to_padded_tensor                 src_key_padding_mask): the batch becomes a nested tensor of the unpadded
                                         rows, the layers run on it with mask=None, and the result is padded back

Neither ONNX exporter translates these, and TS2EPConverter cannot trace nested tensors. `unfuse_script` returns a
copy of the ScriptModule whose forward graph holds only ordinary ops (linear, matmul, softmax, masked_fill,
layer_norm, relu/gelu), so every TorchScript route (the TorchScript-based exporter, and TS2EP -> dynamo) can take
it. The nested-tensor path becomes a dense computation with a key padding mask built from the row lengths, which
is exactly what the nested kernels compute (rows of length `keep.sum(1)`, taken from the start of each row, padded
back with the given value).

Plain torch only (no portq imports): portq copies this module verbatim into reproduce scripts. The decompositions
are compiled from source strings (`torch.jit.CompilationUnit`), so they do not need `inspect` to find this file.
"""

from __future__ import annotations

import io
from typing import Any

#: fused ops this pass rewrites (TorchScript spelling)
FUSED_TS_OPS = ("aten::_transformer_encoder_layer_fwd", "aten::_native_multi_head_attention",
                "aten::_nested_tensor_from_mask", "aten::to_padded_tensor", "aten::nested_to_padded_tensor")

# The math of the CPU kernels (aten/src/ATen/native/transformers/attention.cpp, transformer.cpp,
# nested/NestedTensorTransformerFunctions.cpp), batch-first, written with shape-agnostic ops only (sizes read
# with aten::size at run time, never traced constants), so dynamic sequence lengths survive the export.
_DECOMP_SRC = '''
def mha(query: Tensor, key: Tensor, value: Tensor, embed_dim: int, num_head: int, qkv_weight: Tensor,
        qkv_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor, mask: Optional[Tensor], need_weights: bool,
        average_attn_weights: bool, mask_type: Optional[int]) -> Tuple[Tensor, Tensor]:
    head_dim = embed_dim // num_head
    e2 = 2 * embed_dim
    q = torch.nn.functional.linear(query, qkv_weight[0:embed_dim], qkv_bias[0:embed_dim])
    k = torch.nn.functional.linear(key, qkv_weight[embed_dim:e2], qkv_bias[embed_dim:e2])
    v = torch.nn.functional.linear(value, qkv_weight[e2:], qkv_bias[e2:])
    # reshape with a 4-element size list (not unflatten) so the TorchScript-based exporter knows the rank
    b, t, s = query.size(0), query.size(1), key.size(1)
    q = q.reshape([b, t, num_head, head_dim]).transpose(1, 2)
    k = k.reshape([b, s, num_head, head_dim]).transpose(1, 2)
    v = v.reshape([b, s, num_head, head_dim]).transpose(1, 2)
    q = q * (1.0 / float(head_dim) ** 0.5)
    scores = torch.matmul(q, k.transpose(-1, -2))
    if mask is None:
        attn = torch.softmax(scores, -1)
    else:
        # the kernel turns any mask into bool (nonzero = masked out), then a masked softmax that gives 0, not
        # NaN, on fully masked rows
        m = mask
        if m.dtype != torch.bool:
            m = m != 0
        mt = -1
        if mask_type is not None:
            mt = mask_type
        if mt == 1:
            m = m.unsqueeze(1).unsqueeze(1)  # key padding mask (B, S) -> (B, 1, 1, S)
        elif m.dim() == 2:
            m = m.unsqueeze(0).unsqueeze(0)  # attention mask (L, S)
        elif m.dim() == 3:
            m = m.unsqueeze(1)
        attn = torch.softmax(scores.masked_fill(m, float("-inf")), -1).masked_fill(m, 0.0)
    ctx = torch.matmul(attn, v).transpose(1, 2).reshape([b, t, embed_dim])
    out = torch.nn.functional.linear(ctx, proj_weight, proj_bias)
    return out, attn


def head_mean(attn: Tensor) -> Tensor:
    return attn.mean(1)


def no_weights(out: Tensor) -> Tensor:
    return torch.empty([0], dtype=out.dtype)


def encoder_layer(src: Tensor, embed_dim: int, num_heads: int, qkv_weight: Tensor, qkv_bias: Tensor,
                  proj_weight: Tensor, proj_bias: Tensor, use_gelu: bool, norm_first: bool, eps: float,
                  norm_weight_1: Tensor, norm_bias_1: Tensor, norm_weight_2: Tensor, norm_bias_2: Tensor,
                  ffn_weight_1: Tensor, ffn_bias_1: Tensor, ffn_weight_2: Tensor, ffn_bias_2: Tensor,
                  mask: Optional[Tensor], mask_type: Optional[int]) -> Tensor:
    x = src
    if norm_first:
        x = torch.layer_norm(x, [embed_dim], norm_weight_1, norm_bias_1, eps)
    x = mha(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask, False, True,
            mask_type)[0]
    x = x + src
    if not norm_first:
        x = torch.layer_norm(x, [embed_dim], norm_weight_1, norm_bias_1, eps)
    residual = x
    if norm_first:
        x = torch.layer_norm(x, [embed_dim], norm_weight_2, norm_bias_2, eps)
    h = torch.nn.functional.linear(x, ffn_weight_1, ffn_bias_1)
    if use_gelu:
        h = torch.nn.functional.gelu(h)
    else:
        h = torch.relu(h)
    x = torch.nn.functional.linear(h, ffn_weight_2, ffn_bias_2) + residual
    if not norm_first:
        x = torch.layer_norm(x, [embed_dim], norm_weight_2, norm_bias_2, eps)
    return x


def padding_from_keep(keep: Tensor) -> Tensor:
    # _nested_tensor_from_mask keeps the first keep.sum(1) rows of each batch entry (it assumes a left-aligned
    # mask and, traced with mask_check=False, never checks it): padded = position >= that length
    lengths = keep.to(torch.int64).sum(1, keepdim=True)
    positions = torch.ones_like(keep, dtype=torch.int64).cumsum(1) - 1
    return positions >= lengths


def repad(x: Tensor, padded: Tensor, padding: float) -> Tensor:
    return x.masked_fill(padded.unsqueeze(-1), padding)
'''

_CU: Any = None


def _decomp(name: str) -> Any:
    global _CU
    if _CU is None:
        import torch

        _CU = torch.jit.CompilationUnit(_DECOMP_SRC)
    return getattr(_CU, name)


class UnfuseError(RuntimeError):
    """The graph uses a fused op in a way the pass cannot rewrite (the message says what and where)."""


def clone_script(script: Any) -> Any:
    """An independent copy (its own compilation unit), so rewriting its graphs leaves the original intact."""
    import torch

    buf = io.BytesIO()
    torch.jit.save(script, buf)
    buf.seek(0)
    return torch.jit.load(buf, map_location="cpu")


def fused_ops(script: Any) -> list[str]:
    """The fused fast-path ops a ScriptModule's (inlined) forward graph holds."""
    graph = script.inlined_graph  # keep a reference: the graph dies with the temporary
    return sorted({n.kind() for k in FUSED_TS_OPS for n in graph.findAllNodes(k)})


def _insert(graph: Any, node: Any, fn_name: str, inputs: list[Any]) -> list[Any]:
    """Insert the decomposition's graph before `node`; returns its outputs (a returned tuple is unpacked)."""
    with graph.insert_point_guard(node):
        outs = graph.insertGraph(_decomp(fn_name).graph, inputs)
    if len(outs) == 1 and outs[0].node().kind() == "prim::TupleConstruct":
        return list(outs[0].node().inputs())
    return outs


def _constant_before(graph: Any, node: Any, value: Any) -> Any:
    with graph.insert_point_guard(node):
        return graph.insertConstant(value)


def _is_none(value: Any) -> bool:
    return value.node().kind() == "prim::Constant" and value.type().kind() == "NoneType"


def unfuse_graph(graph: Any) -> list[str]:
    """Rewrite the fused transformer ops of an (inlined) TorchScript graph in place; returns notes on what changed.

    Nested values (outputs of _nested_tensor_from_mask and of encoder layers fed by them) are tracked with the
    padding mask of their batch; any other consumer of a nested value is refused with UnfuseError.
    """
    import torch

    notes: list[str] = []
    padded_of: dict[Any, Any] = {}  # nested value (by unique id) -> (dense value, padding mask value)

    def key(v: Any) -> int:
        return v.unique()

    counts: dict[str, int] = {}
    for node in list(graph.nodes()):
        kind = node.kind()
        if kind not in FUSED_TS_OPS:
            for v in node.inputs():
                if key(v) in padded_of:
                    raise UnfuseError(
                        f"a nested tensor (TransformerEncoder's enable_nested_tensor path) flows into {kind}; only "
                        "encoder layers and to_padded_tensor are rewritten")
            continue
        counts[kind] = counts.get(kind, 0) + 1
        ins = list(node.inputs())
        if kind == "aten::_nested_tensor_from_mask":
            t, keep = ins[0], ins[1]
            (padded,) = _insert(graph, node, "padding_from_keep", [keep])
            padded_of[key(node.output())] = (t, padded)
            # the node itself is dead once its consumers are rewritten; DCE removes it
        elif kind in ("aten::to_padded_tensor", "aten::nested_to_padded_tensor"):
            src = ins[0]
            if key(src) not in padded_of:
                raise UnfuseError(f"{kind} on a value that is not a nested tensor from _nested_tensor_from_mask")
            dense, padded = padded_of[key(src)]
            (out,) = _insert(graph, node, "repad", [dense, padded, ins[1]])
            node.output().replaceAllUsesWith(out)
            node.destroy()
        elif kind == "aten::_transformer_encoder_layer_fwd":
            src = ins[0]
            nested = padded_of.get(key(src))
            if nested is not None:
                dense, padded = nested
                if not _is_none(ins[18]):
                    raise UnfuseError("_transformer_encoder_layer_fwd on a nested tensor with an attention mask")
                ins = [dense, *ins[1:18], padded, _constant_before(graph, node, 1)]  # key padding mask, mask_type 1
            (out,) = _insert(graph, node, "encoder_layer", ins)
            node.output().replaceAllUsesWith(out)
            node.destroy()
            if nested is not None:  # the layer's result is still "nested" for its consumers
                padded_of[key(out)] = (out, nested[1])
        elif kind == "aten::_native_multi_head_attention":
            need, average = ins[10].toIValue(), ins[11].toIValue()
            if not isinstance(need, bool) or not isinstance(average, bool):
                raise UnfuseError("_native_multi_head_attention with non-constant need_weights/average_attn_weights")
            out, attn = _insert(graph, node, "mha", ins)
            if not need:
                (weights,) = _insert(graph, node, "no_weights", [out])
            elif average:
                (weights,) = _insert(graph, node, "head_mean", [attn])
            else:
                weights = attn
            outs = [out, weights]
            for old, new in zip(node.outputs(), outs):
                old.replaceAllUsesWith(new)
            node.destroy()
    # the nested-from-mask nodes are dead now (their consumers read the dense value)
    for node in list(graph.findAllNodes("aten::_nested_tensor_from_mask")):
        if any(o.uses() for o in node.outputs()):
            raise UnfuseError("_nested_tensor_from_mask still has consumers after the rewrite")
        node.destroy()
    torch._C._jit_pass_inline(graph)
    torch._C._jit_pass_peephole(graph)
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_dce(graph)
    left = sorted({n.kind() for k in FUSED_TS_OPS for n in graph.findAllNodes(k)})
    if left:
        raise UnfuseError(f"fused ops left after the rewrite (inside control flow?): {', '.join(left)}")
    for kind, n in sorted(counts.items()):
        notes.append(f"rewrote {n} x {kind} into plain ops")
    return notes


def unfuse_script(script: Any) -> tuple[Any, list[str]]:
    """A copy of `script` whose forward has no fused transformer ops, and notes on what was rewritten.

    Returns the original module and no notes when there is nothing to rewrite. The copy's forward graph is
    inlined (submodule calls expanded), so its other methods are untouched and unused by export.
    """
    import torch

    if not fused_ops(script):
        return script, []
    clone = clone_script(script)
    graph = clone.forward.graph
    torch._C._jit_pass_inline(graph)
    notes = unfuse_graph(graph)
    return clone, notes
