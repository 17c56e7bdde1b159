"""int8 on top of the transformer fusions: the `onnx.transformer-int8-dynamic` and `onnx.transformer-int8-static`
variants. Each runs `transformer.ort_transformer` (the Attention rewrite and onnxruntime's fusions) and quantizes
the fused graph with `precision`'s recipe, in one step, so that its reproduce script runs both.

Dynamic int8 turns Attention into QAttention (int8 Q/K/V projection) and the other MatMuls into int8 MatMuls.
QAttention has no attention_bias input and onnxruntime's quantizer drops that input without a word, so an
Attention that kept a float mask (`attention.fuse_attention`) is left in float32 (`nodes_to_exclude`). Static int8
(QDQ) has no quantized Attention: the fused Attention stays float32 and the MatMuls around it get QDQ.

Plain functions, as in `optimize`; the variants are registered below (lines marked `portq-only`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import ClassVar, Literal

from portq.tasks.formats.onnx.optimize import _fused_ops, _load  # portq-only
from portq.tasks.formats.onnx.precision import int8_dynamic, int8_static  # portq-only
from portq.tasks.formats.onnx.transformer import ort_transformer  # portq-only
from portq.tasks.formats.onnx.variants import CPU, LOSSY, onnx_variant  # portq-only

DYNAMIC = ("onnxruntime's transformer fusions, then int8 weights with activations quantized at run time (QAttention, "
           "int8 MatMuls)")
STATIC = ("onnxruntime's transformer fusions, then int8 QDQ MatMuls with activation ranges calibrated on samples "
          "(Attention stays float32)")
_INT8 = {"modules": LOSSY, "precision": "int8", "candidate_for": CPU}  # portq-only

#: the options each step reads; the rest of a variant's options go to both
_FUSION_OPTS = ("model_type", "canonicalize", "attention_rewrite", "embed_layer_norm", "gelu_approximation",
                "skip_layer_norm", "force")


def _fuse(in_path: str, td: str, opts: dict) -> tuple[str, dict, list]:
    """The fused graph in `td`, its facts, and the Attention nodes int8 must leave alone (they take a float mask)."""
    fused = os.path.join(td, "fused.onnx")
    facts = ort_transformer(in_path, fused, {k: v for k, v in opts.items() if k != "op_types"})
    model = _load(fused)
    keep_float = [n.name for n in model.graph.node if n.op_type == "Attention" and n.domain == "com.microsoft"
                  and len(n.input) > 5 and n.input[5]]
    return fused, facts, keep_float


def _combined(fusion: dict, quant: dict, out_path: str, keep_float: list) -> dict:
    import onnx

    out = onnx.load(out_path, load_external_data=False)
    facts = {**quant, "fused_ops": _fused_ops(out), "attention_kept_float": keep_float,
             "fusion": {k: fusion[k] for k in ("fused", "fused_ops", "attention_rewrite", "opt_level", "nodes_after")
                        if k in fusion}}
    return facts


@dataclass(frozen=True)
class TransformerInt8DynamicConfig:
    """The transformer fusions (`TransformerFusionConfig`'s defaults), then dynamic int8 of the fused graph."""

    model_type: str = "bert"
    attention_rewrite: bool = True
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Attention")
    per_channel: bool = False
    weight_type: Literal["QInt8", "QUInt8"] = "QInt8"
    reduce_range: bool = False
    version: ClassVar[int] = 1


@onnx_variant("transformer-int8-dynamic", DYNAMIC, TransformerInt8DynamicConfig(), **_INT8)  # portq-only
def transformer_int8_dynamic(in_path: str, out_path: str, opts: dict) -> dict:
    """Transformer fusions, then dynamic int8 (`precision.int8_dynamic`) of the fused graph's Attention, MatMul
    and Gemm nodes."""
    with tempfile.TemporaryDirectory() as td:
        fused, fusion, keep_float = _fuse(in_path, td, opts)
        quant_opts = {k: v for k, v in opts.items() if k not in _FUSION_OPTS}
        quant_opts["nodes_to_exclude"] = list(quant_opts.get("nodes_to_exclude", [])) + keep_float
        quant = int8_dynamic(fused, out_path, quant_opts)
    return _combined(fusion, quant, out_path, keep_float)


@dataclass(frozen=True)
class TransformerInt8StaticConfig:
    """The transformer fusions, then static int8 QDQ of the fused graph, calibrated on samples."""

    model_type: str = "bert"
    attention_rewrite: bool = True
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    per_channel: bool = True
    activation_type: Literal["QInt8", "QUInt8"] = "QUInt8"
    weight_type: Literal["QInt8", "QUInt8"] = "QInt8"
    version: ClassVar[int] = 1


@onnx_variant("transformer-int8-static", STATIC, TransformerInt8StaticConfig(), **_INT8,  # portq-only
              needs=frozenset({"calibration"}))  # portq-only
def transformer_int8_static(in_path: str, out_path: str, opts: dict) -> dict:
    """Transformer fusions, then static int8 QDQ (`precision.int8_static`) of the fused graph's MatMul and Gemm
    nodes, calibrated on `opts['calibration']`."""
    with tempfile.TemporaryDirectory() as td:
        fused, fusion, keep_float = _fuse(in_path, td, opts)
        quant = int8_static(fused, out_path, {k: v for k, v in opts.items() if k not in _FUSION_OPTS})
    return _combined(fusion, quant, out_path, keep_float)
