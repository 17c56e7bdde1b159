"""What each ONNX optimization is for, asserted from what it made: static int8's scales come from its calibration
data (a wrong set is detectably worse), the fp16 repair keeps in float32 exactly the nodes where float16 overflows
and leaves every other node in float16, and each onnxruntime level adds its own fused operators (`fused_ops`).
`test_optimizations.py` checks that every variant converts its small model with parity; these check that the
optimization happened. No speed is asserted (the benchmark measures it)."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from portq.tasks.formats.onnx import optimize, precision

from tests.models_optimize import Fp16Overflow, ResidualCNN, randomize_batchnorm


def _export(model: torch.nn.Module, x: np.ndarray, path: Path) -> str:
    torch.onnx.export(model, (torch.from_numpy(x),), str(path), input_names=["x"], output_names=["y"], dynamo=True,
                      opset_version=18, external_data=False)
    return str(path)


def _max_err(path: str, model: torch.nn.Module, xs: list[np.ndarray]) -> float:
    session = optimize._session(path)
    with torch.no_grad():
        return max(float(np.abs(session.run(None, {"x": x})[0] - model(torch.from_numpy(x)).numpy()).max())
                   for x in xs)


# ================================================================================================ static int8
def test_static_int8_scales_come_from_the_calibration_data(tmp_path: Path) -> None:
    """The input's QuantizeLinear scale is the calibration data's min-max range over 255 (uint8, zero included);
    calibrating on random data of the same shape, or on the real data at 20x its scale, gives a detectably worse
    model on held-out real data; the facts count the samples given."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ResidualCNN(width=8, blocks=1))
    rng = np.random.default_rng(0)

    def real(n: int) -> list[np.ndarray]:  # "images": all positive, around 2, unlike N(0, 1)
        return [(2.0 + 0.5 * rng.standard_normal((2, 3, 16, 16))).astype(np.float32) for _ in range(n)]

    calibration, held_out = real(5), real(3)
    base = _export(model, calibration[0], tmp_path / "cnn.onnx")
    sets = {"real": calibration,
            "random": [rng.standard_normal(x.shape).astype(np.float32) for x in calibration],
            "20x": [20 * x for x in calibration]}
    errors, scales = {}, {}
    for name, xs in sets.items():
        npz = optimize.save_samples(str(tmp_path / f"{name}.npz"), [{"x": x} for x in xs])
        out = str(tmp_path / f"int8-{name}.onnx")
        facts = precision.int8_static(base, out, {"calibration": npz, "target": "cpu"})
        assert facts["calibration_samples"] == len(xs) == 5
        graph = onnx.load(out).graph
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        (quant,) = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
        scales[name] = float(inits[quant.input[1]])
        errors[name] = _max_err(out, model, held_out)
    # min-max calibration, uint8 activations: the range [min(x, 0), max(x, 0)] of the data given, over 255 steps
    data = np.concatenate([x.ravel() for x in calibration])
    expected = (max(float(data.max()), 0.0) - min(float(data.min()), 0.0)) / 255
    assert scales["real"] == pytest.approx(expected, rel=1e-5), scales
    assert scales["20x"] == pytest.approx(20 * expected, rel=1e-5), scales
    # measured: real 0.0036, random 0.097, 20x 0.041 (max abs error of the output, whose scale is ~1)
    assert errors["real"] * 4 < min(errors["random"], errors["20x"]), errors


# ================================================================================================ fp16 repair
def _overflowing(path: str, xs: list[np.ndarray]) -> tuple[set[str], set[str]]:
    """(nodes whose float32 output passes float16's range on some sample, the nodes that consume such an output),
    found by running every intermediate value of the float32 graph in onnxruntime."""
    model = onnx.load(path)
    known = {o.name for o in model.graph.output}
    for node in model.graph.node:
        model.graph.output.extend(onnx.ValueInfoProto(name=o) for o in node.output if o and o not in known)
    session = optimize._session(model.SerializeToString(), "ORT_DISABLE_ALL")
    names = [o.name for o in session.get_outputs()]
    big = set()
    for x in xs:
        for name, value in zip(names, session.run(None, {"x": x})):
            if np.issubdtype(value.dtype, np.floating) and np.abs(value).max() > optimize.FP16_MAX:
                big.add(name)
    producers = {n.name for n in model.graph.node if set(n.output) & big}
    consumers = {n.name for n in model.graph.node if set(n.input) & big}
    return producers, consumers


def test_fp16_repair_keeps_exactly_the_overflowing_nodes_in_float32(tmp_path: Path) -> None:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    torch.manual_seed(0)
    model = Fp16Overflow().eval()
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((4, 32)).astype(np.float32) for _ in range(3)]
    base = _export(model, xs[0], tmp_path / "overflow.onnx")
    samples = optimize.save_samples(str(tmp_path / "samples.npz"), [{"x": x} for x in xs])
    out = tmp_path / "mixed.onnx"
    facts = precision.fp16_repair_recipe(base, str(out), {"samples": samples, "atol": 1e-2, "rtol": 1e-2,
                                                          "target": "cpu"})
    assert facts["passed"], facts["history"]
    producers, consumers = _overflowing(base, xs)
    assert producers and consumers - producers, "the model must overflow float16 somewhere"
    kept = facts["node_block_list"]
    # the repair names exactly the nodes the divergence search must find: where values pass 65504, and what reads them
    assert set(kept) == producers | consumers, (sorted(kept), sorted(producers | consumers))
    assert facts["nodes_kept_fp32"] == len(kept)

    repaired = onnx.load(str(out))
    types = {v.name: v.type.tensor_type.elem_type for v in [*repaired.graph.value_info, *repaired.graph.output]}
    original = {n.name: n for n in onnx.load(base).graph.node}
    nodes = {n.name: n for n in repaired.graph.node if n.name in original}
    assert set(nodes) == set(original)
    for name, node in nodes.items():
        dtypes = {types.get(o) for o in node.output if o in types}
        if name in kept or node.op_type in DEFAULT_OP_BLOCK_LIST:
            assert dtypes == {TensorProto.FLOAT}, f"{name} ({node.op_type}) was to stay float32: {dtypes}"
        else:
            assert dtypes == {TensorProto.FLOAT16}, f"{name} ({node.op_type}) was to compute in float16: {dtypes}"
    # the weights of the nodes left in float16 are stored in float16
    fp16_weights = {t.name for t in repaired.graph.initializer if t.data_type == TensorProto.FLOAT16}
    for name, node in nodes.items():
        if name not in kept and node.op_type == "Gemm":
            assert set(node.input[1:]) <= fp16_weights, (name, list(node.input))
    assert _max_err(str(out), model, xs) < 1e-2  # the tolerance the repair was held to (measured 2e-4)


# ================================================================================================ ORT levels
class ConvNormMlp(torch.nn.Module):
    """Conv+BN+ReLU twice, then tokens through LayerNorm, Linear (MatMul+Add on 3-D input) and GELU: patterns each
    onnxruntime level fuses differently."""

    def __init__(self) -> None:
        super().__init__()
        c = torch.nn
        self.conv = c.Sequential(c.Conv2d(3, 16, 3, padding=1), c.BatchNorm2d(16), c.ReLU(),
                                 c.Conv2d(16, 16, 3, padding=1), c.BatchNorm2d(16), c.ReLU())
        self.ln, self.fc, self.head = c.LayerNorm(16), c.Linear(16, 32), c.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return self.head(torch.nn.functional.gelu(self.fc(self.ln(tokens)))).mean(1)


def test_each_ort_level_adds_its_own_fused_operators(tmp_path: Path) -> None:
    """Counted in the saved optimized graph and reported as `fused_ops` (ops the exported graph lacks): basic fuses
    MatMul+Add into Gemm; extended also Conv+ReLU into FusedConv; all also rewrites the convolutions into the NCHWc
    layout (x86 hosts with AVX2 or better)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvNormMlp())
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    base = _export(model, x, tmp_path / "model.onnx")
    source = optimize._op_counts(onnx.load(base))
    assert source.get("Conv") == 2 and source.get("Relu") == 2 and source.get("MatMul") == 2
    fused = {}
    for recipe in (optimize.ort_basic, optimize.ort_extended, optimize.ort_all):
        out = str(tmp_path / f"{recipe.__name__}.onnx")
        facts = recipe(base, out, {"target": "cpu"})
        counts = optimize._op_counts(onnx.load(out))
        assert facts["fused_ops"] == {k: n for k, n in counts.items() if k not in source}, recipe.__name__
        fused[recipe.__name__] = facts["fused_ops"]
        assert _max_err(out, model, [x]) < 1e-4
    assert fused["ort_basic"] == {"Gemm": 2}, fused
    assert fused["ort_extended"] == {"Gemm": 2, "com.microsoft:FusedConv": 2}, fused
    assert fused["ort_all"].get("Gemm") == 2 and "com.microsoft:FusedConv" not in fused["ort_all"], fused
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert fused["ort_all"].get("com.microsoft.nchwc:Conv") == 2, fused
