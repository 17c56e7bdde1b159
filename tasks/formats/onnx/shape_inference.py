"""The `onnx.shape-inference` variant: onnx's own shape inference run on the default artifact, every intermediate
value's type and shape written into the graph (`value_info`), so tools that read shapes from the file (TensorRT's
parser, quantizers, graph viewers) need not infer them again. The graph's nodes are unchanged: exact.

This module is the whole variant (its config, its recipe and its registration): nothing else was edited to add it.
The package imports each of its modules, and the decorator's line is marked `portq-only`, so the reproduce script
carries this module as a plain recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from portq.tasks.formats.onnx.optimize import (  # portq-only
    _graph_facts,
    _has_external_data,
    _load,
    _load_with,
    _save,
)
from portq.tasks.formats.onnx.variants import onnx_variant  # portq-only


@dataclass(frozen=True)
class ShapeInferenceConfig:
    """onnx.shape_inference.infer_shapes' settings."""

    strict_mode: bool = True  # a type or shape error fails the recipe rather than leaving a value untyped
    data_prop: bool = True  # propagate constant shape values (Shape -> Gather -> Reshape) to type more values
    version: ClassVar[int] = 1


@onnx_variant("shape-inference", "every value's shape written into the graph", ShapeInferenceConfig())  # portq-only
def onnx_infer_shapes(in_path: str, out_path: str, opts: dict) -> dict:
    """onnx's shape inference (strict, with data propagation): the graph with every intermediate value's type and
    shape recorded in value_info, its nodes unchanged."""
    import onnx

    model = _load(in_path)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True,
                                                 strict_mode=bool(opts.get("strict_mode", True)),
                                                 data_prop=bool(opts.get("data_prop", True)))
    external = _save(inferred, out_path, _has_external_data(in_path) or None)
    facts = _graph_facts(model, inferred)
    typed = [v for v in inferred.graph.value_info if v.type.tensor_type.HasField("shape")]
    facts.update({"value_info_before": len(model.graph.value_info), "value_info_after": len(typed),
                  "onnx_version": onnx.__version__, "external_data": external, "load_with": _load_with(opts)})
    return facts
