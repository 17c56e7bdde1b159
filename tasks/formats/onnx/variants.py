"""The ONNX variants, each with its config: a frozen, versioned dataclass whose fields are the settings its recipe
reads, with their defaults (torchao's style). An export setting's config is the format options it fixes; an
optimization's config is merged into its recipe's options, recorded in the artifact's report and carried by its
reproduce script. Measured on 2 CPU cores (README, Optimization): which candidates `--optimize auto` tries per target
follows from it.

A new variant is one new entry: here, or in a module of its own in this package that registers itself with
`onnx_variant` (the package imports each of its modules).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, ClassVar, Literal

from portq.tasks.formats.base import Transform, Variant, VariantConfig
from portq.tasks.formats.hardware import cpu_has_native_fp16
from portq.tasks.formats.onnx import attention, optimize, precision, transformer
from portq.tasks.formats.onnx.handler import ONNX

CPU, CUDA = frozenset({"cpu"}), frozenset({"cuda"})
#: the recipe modules a reproduce script carries for a graph optimization and for a lossy one
GRAPH: tuple[ModuleType, ...] = (optimize,)
LOSSY: tuple[ModuleType, ...] = (optimize, attention, transformer, precision)


@dataclass(frozen=True)
class OnnxExportConfig:
    """An export setting: the format options it fixes (None: the format's default)."""

    opset: int | None = None
    external_data: Literal["auto", "always"] | None = None
    version: ClassVar[int] = 1


@dataclass(frozen=True)
class OrtOptimizeConfig:
    """onnxruntime's graph optimizer at `level`, the result saved offline (`optimize.ort_basic` and its siblings)."""

    level: Literal["ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"] = "ORT_ENABLE_ALL"
    portable: bool = False  # ORT_ENABLE_ALL only: leave out the NCHWc layouts reordered for this CPU
    avoid_slow_cpu_fusions: bool = True  # optimize.SLOW_CPU_FUSIONS off for cpu targets
    version: ClassVar[int] = 1


@dataclass(frozen=True)
class TransformerFusionConfig:
    """onnxruntime.transformers' fusions (`transformer.ort_transformer`; Optimum's O2)."""

    model_type: str = "bert"
    canonicalize: bool = True  # rewrite dynamo idioms so that Attention fusion fires
    attention_rewrite: bool = True  # self-attention blocks -> com.microsoft.Attention (`attention.fuse_attention`)
    embed_layer_norm: bool = False  # as Optimum: EmbedLayerNormalization breaks int8 quantization
    gelu_approximation: bool = False  # True: FastGelu (Optimum's O3), slightly lossy
    sdpa_fusion: bool | Literal["only"] = False
    force: bool = False  # skip the transformer-like check
    avoid_slow_cpu_fusions: bool = True
    version: ClassVar[int] = 2  # 2: attention_rewrite


@dataclass(frozen=True)
class OnnxSlimConfig:
    """onnxslim with its default passes (`optimize.onnxslim`)."""

    version: ClassVar[int] = 1


@dataclass(frozen=True)
class Fp16Config:
    """float16 by onnxruntime's converter with its op block list (`precision.fp16`)."""

    keep_io_types: bool = True  # inputs and outputs stay float32
    disable_shape_infer: bool = False
    smoke_test: bool = True  # run the converted model once on random inputs
    version: ClassVar[int] = 1


@dataclass(frozen=True)
class Fp16RepairConfig:
    """float16 with the diverging nodes kept in float32 (`precision.fp16_repair_recipe`)."""

    max_iters: int = 6
    version: ClassVar[int] = 1


@dataclass(frozen=True)
class Int8DynamicConfig:
    """int8 weights, activations quantized at run time (`precision.int8_dynamic`)."""

    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Attention")  # never Conv: slower on CPUs
    per_channel: bool = False
    weight_type: Literal["QInt8", "QUInt8"] = "QInt8"
    reduce_range: bool = False
    preprocess: bool = True
    version: ClassVar[int] = 1


@dataclass(frozen=True)
class Int8StaticConfig:
    """int8 QDQ with activation ranges calibrated on samples (`precision.int8_static`)."""

    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    op_types: str | tuple[str, ...] = "auto"
    per_channel: bool = True
    activation_type: Literal["QInt8", "QUInt8"] = "QUInt8"
    weight_type: Literal["QInt8", "QUInt8"] = "QInt8"
    reduce_range: bool = False
    preprocess: bool = True
    version: ClassVar[int] = 1


def _no_native_fp16(target: str) -> str | None:
    if target == "cpu" and not cpu_has_native_fp16():
        return ("onnxruntime's CPU provider computes fp16 through casts to fp32 on this CPU (no AVX-512 FP16): "
                "never faster; ask for onnx.fp16 by name to measure it anyway")
    return None


#: How many times faster than its base each optimization can run, at most (`Variant.headroom`), from the README's
#: measurements on 2 CPU cores: onnxruntime's session applies its graph optimizations when it loads any file, so
#: saving them offline gains little over the base; the transformer fusions add kernels the session does not fuse
#: (1.5x over the base on a 4-layer BERT); int8 at most 4x (a quarter of the bytes), fp16 at most 2x. `--optimize
#: auto` prunes a variant whose base, measured, leaves it no room to beat the source or the best so far.
HEADROOM: dict[str, float] = {"ort-basic": 1.15, "ort-extended": 1.15, "ort-all": 1.15, "slim": 1.15,
                              "ort-transformer": 2.0, "fp16": 2.0, "fp16-mixed": 2.0, "int8-dynamic": 4.0,
                              "int8-static": 4.0}


def register(variant: Variant) -> Variant:
    if variant.headroom is None and variant.name in HEADROOM:
        variant = replace(variant, headroom=HEADROOM[variant.name])
    ONNX.variants.add(variant.name, variant)
    return variant


def onnx_variant(name: str, description: str, config: VariantConfig, *, modules: tuple[ModuleType, ...] = GRAPH,
                 **kw: Any) -> Callable[[Transform], Transform]:
    """Register the decorated plain recipe as the ONNX optimization variant `name`, made from the default artifact;
    its reproduce script carries `modules` and the recipe's own module. Mark the decorator's line `portq-only`, so
    the module stays copyable into reproduce scripts."""
    import sys

    def add(recipe: Transform) -> Transform:
        own = sys.modules[recipe.__module__]
        register(Variant(name, description, config, base="default", transform=recipe,
                         recipe_modules=tuple(dict.fromkeys((*modules, own))), **kw))
        return recipe

    return add


for _variant in (
    Variant("opset17", "ONNX at opset 17, for runtimes that do not read opset 18 yet", OnnxExportConfig(opset=17)),
    Variant("external", "ONNX with every weight in model.onnx.data beside model.onnx (what models over 2 GB get "
            "anyway)", OnnxExportConfig(external_data="always")),
    Variant("ort-basic", "onnxruntime's basic graph optimizations (constant folding, redundant nodes), saved "
            "offline", OrtOptimizeConfig(level="ORT_ENABLE_BASIC"), base="default", transform=optimize.ort_basic,
            recipe_modules=GRAPH),
    Variant("ort-extended", "onnxruntime's extended optimizations (operator fusions) saved offline, portable; "
            "layout transforms applied when it loads", OrtOptimizeConfig(level="ORT_ENABLE_EXTENDED"),
            base="default", transform=optimize.ort_extended, recipe_modules=GRAPH, candidate_for=CPU),
    Variant("ort-all", "every onnxruntime optimization saved offline, layout transforms included: NCHWc "
            "weights reordered for this host's SIMD width, so serve it on the same kind of CPU",
            OrtOptimizeConfig(level="ORT_ENABLE_ALL"), base="default", transform=optimize.ort_all,
            recipe_modules=GRAPH, candidate_for=CPU),
    Variant("ort-transformer", "onnxruntime's transformer fusions (Attention, LayerNorm, Gelu; Optimum's O2) on "
            "transformer-like graphs", TransformerFusionConfig(), base="default",
            transform=transformer.ort_transformer, recipe_modules=(optimize, attention, transformer),
            candidate_for=CPU | CUDA),
    Variant("slim", "onnxslim graph simplification", OnnxSlimConfig(), base="default", transform=optimize.onnxslim,
            recipe_modules=GRAPH),
    Variant("fp16", "float16 weights and activations (inputs and outputs stay float32), with onnxruntime's "
            "op block list", Fp16Config(), base="default", transform=precision.fp16, recipe_modules=LOSSY,
            precision="fp16", candidate_for=CPU | CUDA, auto_skip=_no_native_fp16, repair="fp16-mixed"),
    Variant("fp16-mixed", "float16 with the nodes where fp16 diverges kept in float32 (the repair of a failing "
            "fp16 variant)", Fp16RepairConfig(), base="default", transform=precision.fp16_repair_recipe,
            recipe_modules=LOSSY, precision="fp16", needs=frozenset({"samples"})),
    Variant("int8-dynamic", "int8 weights, activations quantized at run time (MatMul and Gemm; never Conv, "
            "which is slower so on CPUs)", Int8DynamicConfig(), base="default", transform=precision.int8_dynamic,
            recipe_modules=LOSSY, precision="int8", candidate_for=CPU),
    Variant("int8-static", "int8 QDQ, per-channel weights, activation ranges calibrated on samples "
            "(--calibration, else the job's own)", Int8StaticConfig(), base="default",
            transform=precision.int8_static, recipe_modules=LOSSY, precision="int8", candidate_for=CPU,
            needs=frozenset({"calibration"})),
):
    register(_variant)


@dataclass(frozen=True)
class OnnxRouteConfig:
    """An export route as a setting: the ladder restricted to `routes` (`Variant.routes`)."""

    routes: tuple[str, ...] = ()
    version: ClassVar[int] = 1


#: Route variants: the same source exported by another route of the ladder, whose graph may optimize better (a
#: TorchScript source's default is the TorchScript-based exporter; ts2ep gives the dynamo exporter's graph). Each is
#: a family of its own: `derive_route_families` gives it a copy of every optimization made from the default artifact.
ROUTE_FAMILIES: dict[str, Variant] = {
    "ts2ep": Variant("ts2ep", "ONNX by the ts2ep route (TorchScript -> ExportedProgram -> the dynamo exporter) "
                     "instead of the TorchScript-based exporter", OnnxRouteConfig(routes=("ts2ep", "ts2ep_decomposed")),
                     fixed={}, routes=("ts2ep", "ts2ep_decomposed"), candidate_for=CPU | CUDA,
                     source_kinds=frozenset({"torchscript"})),
}


def derive_route_families() -> None:
    """Register each route variant and, for every optimization variant made from the default artifact, its copy made
    from the route variant's artifact instead (`ts2ep-ort-transformer`). Run once every variant module registered."""
    bases = [v for _, v in ONNX.variants if v.base == "default" and v.transform is not None]
    for name, route in ROUTE_FAMILIES.items():
        register(route)
        for v in bases:
            register(replace(v, name=f"{name}-{v.name}", base=name, source_kinds=route.source_kinds,
                             description=f"{v.description}; made from the {name} route's export",
                             repair=f"{name}-{v.repair}" if v.repair else None))
