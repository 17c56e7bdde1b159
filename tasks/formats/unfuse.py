"""Plain-op definitions of PyTorch's fused fast-path kernels, for exporters that have no translation for them.

`nn.MultiheadAttention` and `nn.TransformerEncoderLayer` take a fused "fast path" in inference
(eval mode under no_grad): a TorchScript archive traced that way holds `aten::_native_multi_head_attention`
or `aten::_transformer_encoder_layer_fwd`, which neither ONNX exporter translates. Run as decompositions
(`ExportedProgram.run_decompositions(UNFUSED)`), these functions rewrite each fused call into the ordinary
ops it stands for, which every exporter handles. They follow the kernels in
aten/src/ATen/native/transformers/attention.cpp and transformer.cpp.
"""

from __future__ import annotations

import math
from typing import Any


def native_multi_head_attention(
    query: Any, key: Any, value: Any, embed_dim: int, num_head: int, qkv_weight: Any, qkv_bias: Any,
    proj_weight: Any, proj_bias: Any, mask: Any = None, need_weights: bool = True,
    average_attn_weights: bool = True, mask_type: int | None = None,
) -> tuple[Any, Any]:
    """aten::_native_multi_head_attention: batch-first inputs, packed in-projection, boolean-ish mask."""
    import torch
    import torch.nn.functional as F

    b, t, _ = query.shape
    s = key.shape[1]
    head_dim = embed_dim // num_head
    w_q, w_k, w_v = qkv_weight.chunk(3, dim=0)
    b_q, b_k, b_v = qkv_bias.chunk(3, dim=0)

    def heads(x: Any, w: Any, bias: Any, length: int) -> Any:
        return F.linear(x, w, bias).reshape(b, length, num_head, head_dim).transpose(1, 2)

    q = heads(query, w_q, b_q, t) / math.sqrt(head_dim)
    scores = q @ heads(key, w_k, b_k, s).transpose(-1, -2)  # b, heads, t, s
    masked = None
    if mask is not None:
        # the kernel turns any mask into bool (nonzero = masked out): a float mask of 0/-inf means the same
        masked = mask if mask.dtype == torch.bool else mask != 0
        if mask_type == 1 or (masked.dim() == 2 and tuple(masked.shape) == (b, s) and mask_type != 0):
            masked = masked.reshape(b, 1, 1, s)  # key padding mask
        elif masked.dim() == 2:
            masked = masked.reshape(1, 1, t, s)  # attention mask
        elif masked.dim() == 3:
            masked = masked.unsqueeze(1)
        scores = scores.masked_fill(masked, float("-inf"))
    attn = scores.softmax(-1)
    if masked is not None:
        # the kernel's masked softmax gives 0 (not NaN) where a whole row is masked
        attn = attn.masked_fill(masked, 0.0)
    context = (attn @ heads(value, w_v, b_v, s)).transpose(1, 2).reshape(b, t, embed_dim)
    out = F.linear(context, proj_weight, proj_bias)
    if not need_weights:
        return out, out.new_zeros(0)
    return out, attn.mean(1) if average_attn_weights else attn


def transformer_encoder_layer_fwd(
    src: Any, embed_dim: int, num_heads: int, qkv_weight: Any, qkv_bias: Any, proj_weight: Any, proj_bias: Any,
    use_gelu: bool, norm_first: bool, eps: float, norm_weight_1: Any, norm_bias_1: Any, norm_weight_2: Any,
    norm_bias_2: Any, ffn_weight_1: Any, ffn_bias_1: Any, ffn_weight_2: Any, ffn_bias_2: Any, mask: Any = None,
    mask_type: int | None = None,
) -> Any:
    """aten::_transformer_encoder_layer_fwd: one nn.TransformerEncoderLayer (post- or pre-norm)."""
    import torch.nn.functional as F

    def norm1(x: Any) -> Any:
        return F.layer_norm(x, (embed_dim,), norm_weight_1, norm_bias_1, eps)

    def norm2(x: Any) -> Any:
        return F.layer_norm(x, (embed_dim,), norm_weight_2, norm_bias_2, eps)

    x = norm1(src) if norm_first else src
    x, _ = native_multi_head_attention(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                       mask, False, True, mask_type)
    x = x + src
    if not norm_first:
        x = norm1(x)
    residual = x
    h = norm2(x) if norm_first else x
    h = F.linear(h, ffn_weight_1, ffn_bias_1)
    h = F.gelu(h) if use_gelu else F.relu(h)
    x = F.linear(h, ffn_weight_2, ffn_bias_2) + residual
    return x if norm_first else norm2(x)


def unfused_table() -> dict[Any, Any]:
    """torch.export's default decompositions plus the fused kernels above."""
    import torch

    table = dict(torch.export.default_decompositions())
    table[torch.ops.aten._native_multi_head_attention.default] = native_multi_head_attention
    table[torch.ops.aten._transformer_encoder_layer_fwd.default] = transformer_encoder_layer_fwd
    return table
