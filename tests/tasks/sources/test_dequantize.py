"""Dynamically quantized models load as their float equivalent (and say so); statically quantized ones are refused
with why and what to do instead."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from portq.tasks.core.errors import ModelLoadError
from portq.tasks.formats.onnx import export as recipes
from portq.tasks.sources.dequantize import FLOAT_NOTE, dequantize_module
from portq.tasks.sources.loading import LoadRequest, load_model
from portq.tasks.sources.recipes import build_source
from torch import nn

from tests.zoo.harder import quantized_tagger

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, tuple[torch.Tensor, ...], Path]:
    torch.manual_seed(30)
    model, args = quantized_tagger().eval(), (torch.randn(2, 6, 8),)
    folder = tmp_path_factory.mktemp("quantized")
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, args, check_trace=False), folder / "traced.pt")
    torch.jit.save(torch.jit.script(model), folder / "scripted.pt")
    torch.save(model, folder / "whole.pt")
    return model, args, folder


def test_a_pickled_module_becomes_float_with_the_int8_weights(quantized) -> None:
    model, args, _ = quantized
    float_model, notes = dequantize_module(model)
    assert notes[0] == FLOAT_NOTE and any("LSTM -> nn.LSTM" in n for n in notes)
    assert not any("quantized" in type(m).__module__ for m in float_model.modules())
    with torch.no_grad():  # activations are no longer quantized: close to the int8 model, not equal
        assert 0 < (float_model(*args) - model(*args)).abs().max() < 0.02


@pytest.mark.parametrize("name", ["traced.pt", "scripted.pt", "whole.pt"])
def test_every_kind_of_file_loads_as_the_same_float_equivalent(quantized, name: str, tmp_path: Path) -> None:
    model, args, folder = quantized
    loaded = load_model(LoadRequest(path=folder / name, display=name, trust_pickle=True))
    assert loaded.notes[0] == FLOAT_NOTE
    reference, _ = dequantize_module(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(*args), reference(*args), atol=1e-6, rtol=1e-5)
    # the reproduce scripts build the same float source
    rebuilt = build_source({"kind": loaded.kind, "model": str(folder / name)})
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.module(*args), reference(*args), atol=1e-6, rtol=1e-5)
    if name == "traced.pt":  # and it converts, with a dynamic sequence length
        import onnxruntime as ort

        source = types.SimpleNamespace(module=loaded.module, script=loaded.script, program=None)
        opts = {"input_names": ["x"], "output_names": ["logits"], "dynamic": {0: {1: "seq"}}, "opset": 18}
        recipes.onnx_torchscript(source, args, str(tmp_path / "q.onnx"), opts)
        session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
        longer = torch.randn(2, 11, 8)
        (got,) = session.run(None, {"x": longer.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, reference(longer).numpy(), atol=1e-4, rtol=1e-3)


class Static(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.fc = torch.ao.quantization.QuantStub(), nn.Linear(4, 4)
        self.dq = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dq(self.fc(self.q(x)))


def test_static_quantization_is_refused_with_what_to_do(tmp_path: Path) -> None:
    model = Static().eval()
    model.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    prepared = torch.ao.quantization.prepare(model)
    prepared(torch.randn(8, 4))
    converted = torch.ao.quantization.convert(prepared)
    torch.save(converted, tmp_path / "static.pt")
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(converted, (torch.randn(2, 4),), check_trace=False), tmp_path / "static_ts.pt")
    for name in ("static.pt", "static_ts.pt"):
        with pytest.raises(ModelLoadError) as e:
            load_model(LoadRequest(path=tmp_path / name, display=name, trust_pickle=True))
        assert "statically quantized" in e.value.message and "no float equivalent" in e.value.message
        assert "submit the float model (state dict with --arch)" in e.value.message
