"""First-divergence localisation on artifacts that really fail parity at a known layer."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from portq.tasks.core.contract import Format, InputSpec, JobStatus
from portq.tasks.execution.run import run_job
from portq.tasks.formats import FORMATS
from portq.tasks.formats.onnx.localise import onnx_candidates
from portq.tasks.state.store import Store
from torch import nn

from tests.jobs import prepare

FAST_LATENCY = {"warmup": 1, "runs": 2, "windows": 2, "min_window_ms": 0, "sweep": False}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(x)).softmax(-1)


@pytest.fixture(scope="module")
def program_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("div") / "net.pt2"
    torch.export.save(torch.export.export(Net().eval(), (torch.randn(3, 8),)), str(path))
    return path


def _perturbing(handler, mutate):
    """The same format handler, with the written artifact passed through `mutate` before it is checked."""
    finish = handler.finish

    def perturbed(req, path, route):
        mutate(path)
        return finish(req, path, route)

    return dataclasses.replace(handler, finish=perturbed)


def _bump_initializer(name, delta):
    def mutate(path):
        model = onnx.load(str(path))
        (init,) = [i for i in model.graph.initializer if i.name == name]
        array = onnx.numpy_helper.to_array(init).copy()
        array.reshape(-1)[0] += np.float32(delta)  # one element: a uniform shift would vanish in LayerNorm/softmax
        init.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), name))
        data = path.parent / f"{path.name}.data"
        if data.exists():  # the weights stay where they were: external data beside the file
            data.unlink()
            onnx.save_model(model, str(path), save_as_external_data=True, location=data.name, size_threshold=64)
        else:
            onnx.save(model, str(path))
    return mutate


def _run(program_file, tmp_path, fmt=Format.onnx, **options):
    store = Store(str(tmp_path / "store"))
    (spec,) = prepare([str(program_file)], store, batch="div", max_bytes=1 << 30,
                      options={"formats": [fmt], "latency": FAST_LATENCY, **options}).specs
    return run_job(spec, store)


@pytest.mark.parametrize("initializer, node, op_type, module, module_class, fx", [
    ("net.2.weight", "node_linear_1", "Gemm", "net.2", "torch.nn.modules.linear.Linear", "linear_1"),
    ("norm.bias", "node_layer_norm", "LayerNormalization", "norm", "torch.nn.modules.normalization.LayerNorm",
     "layer_norm"),
])
def test_onnx_divergence_is_named_at_the_perturbed_layer(program_file, tmp_path, monkeypatch, initializer, node,
                                                         op_type, module, module_class, fx):
    handler = FORMATS.get("onnx")
    monkeypatch.setitem(FORMATS._items, "onnx", _perturbing(handler, _bump_initializer(initializer, 0.5)))
    report = run_job_and_check_failed(program_file, tmp_path)
    (art,) = report.artifacts
    d = art.parity.first_divergence
    assert d is not None, art.parity.localisation
    assert (d.node, d.op_type, d.module, d.module_class, d.source_node) == (node, op_type, module, module_class, fx)
    assert d.max_abs_err > 0.1 and d.compared >= 1
    assert node in report.error and "first diverges" in report.error


def test_an_artifact_with_external_data_is_localised_too(program_file, tmp_path, monkeypatch):
    """model.onnx + model.onnx.data: the widened graph is run beside the artifact, where its weights are found."""
    handler = FORMATS.get("onnx")
    perturbed = _perturbing(handler, _bump_initializer("net.2.weight", 0.5))
    perturbed.variants = handler.variants
    monkeypatch.setitem(FORMATS._items, "onnx", perturbed)
    report = run_job_and_check_failed(program_file, tmp_path, formats=["onnx.external"])
    (art,) = report.artifacts
    assert art.data == ["onnx.external/model.onnx.data"]
    d = art.parity.first_divergence
    assert d is not None and d.node == "node_linear_1", art.parity.localisation


def run_job_and_check_failed(program_file, tmp_path, **kw):
    report = _run(program_file, tmp_path, **kw)
    assert report.status is JobStatus.failed
    (art,) = report.artifacts
    assert not art.parity.passed and art.latency is not None  # measured all the same
    return report


def test_divergence_error_is_the_nodes_own_error(program_file, tmp_path, monkeypatch):
    """The error reported at the divergent node equals a direct comparison of that node's two values."""
    handler = FORMATS.get("onnx")
    monkeypatch.setitem(FORMATS._items, "onnx", _perturbing(handler, _bump_initializer("net.2.bias", 0.25)))
    report = run_job_and_check_failed(program_file, tmp_path)
    d = report.artifacts[0].parity.first_divergence
    assert d.node == "node_linear_1" and d.shape == [3, 4]
    # by hand: a bias shift of 0.25 on output feature 0 moves one column of linear_1 by exactly 0.25
    assert d.max_abs_err == pytest.approx(0.25, abs=1e-5)
    assert d.mean_abs_err == pytest.approx(0.25 / 4, abs=1e-5)


def test_passing_parity_is_not_localised(program_file, tmp_path):
    report = _run(program_file, tmp_path)
    assert report.status is JobStatus.succeeded
    assert report.artifacts[0].parity.first_divergence is None


def test_pt2_divergence(program_file, tmp_path, monkeypatch):
    def mutate(path):
        program = torch.export.load(str(path))
        with torch.no_grad():
            program.state_dict["net.0.weight"][0, 0] += 0.5
        torch.export.save(program, str(path))

    monkeypatch.setitem(FORMATS._items, "pt2", _perturbing(FORMATS.get("pt2"), mutate))
    report = run_job_and_check_failed(program_file, tmp_path, fmt=Format.pt2)
    d = report.artifacts[0].parity.first_divergence
    assert d is not None, report.artifacts[0].parity.localisation
    assert (d.source_node, d.module) == ("linear", "net.0") and "Linear" in d.module_class


def test_pt2_divergence_from_a_torchscript_source(tmp_path, monkeypatch):
    torch.manual_seed(0)
    source = tmp_path / "net.pt"
    torch.jit.save(torch.jit.trace(Net().eval(), torch.randn(3, 8)), str(source))

    def mutate(path):
        program = torch.export.load(str(path))
        norm_weight = next(k for k in program.state_dict if "norm" in k and k.endswith("weight"))
        with torch.no_grad():
            program.state_dict[norm_weight].reshape(-1)[0] += 0.5
        torch.export.save(program, str(path))

    monkeypatch.setitem(FORMATS._items, "pt2", _perturbing(FORMATS.get("pt2"), mutate))
    report = run_job_and_check_failed(source, tmp_path, fmt=Format.pt2, inputs=[InputSpec.parse("x:float32[3,8]")])
    parity = report.artifacts[0].parity
    assert parity.first_divergence is not None, parity.localisation
    assert parity.first_divergence.source_node == "layer_norm"


def test_candidates_come_from_the_exporters_metadata(tmp_path):
    torch.onnx.export(Net().eval(), (torch.randn(2, 8),), str(tmp_path / "m.onnx"), dynamo=True,
                      input_names=["x"], output_names=["y"], verbose=False)
    found = onnx_candidates(onnx.load(str(tmp_path / "m.onnx")))
    assert found["linear"].value == "linear" and found["linear"].module == "net.0"
    assert found["softmax"].value == "y"  # renamed as the graph output
    assert found["softmax"].module is None and found["gelu"].module_class.endswith("GELU")


def _bump_second_gemm_weight(delta):
    def mutate(path):
        model = onnx.load(str(path))
        gemm = [n for n in model.graph.node if n.op_type == "Gemm"][1]
        (init,) = [i for i in model.graph.initializer if i.name == gemm.input[1]]
        array = onnx.numpy_helper.to_array(init).copy()
        array.reshape(-1)[0] += np.float32(delta)
        init.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), init.name))
        onnx.save(model, str(path))
    return mutate


def test_onnx_without_metadata_is_localised_by_value(tmp_path, monkeypatch):
    """A TorchScript source takes the TorchScript-based exporter, whose ONNX keeps no fx names."""
    torch.manual_seed(1)
    x = torch.randn(3, 8)
    torch.jit.save(torch.jit.trace(Net().eval(), x), str(tmp_path / "net.pt"))
    np.savez(tmp_path / "net.npz", x=x.numpy())
    monkeypatch.setitem(FORMATS._items, "onnx", _perturbing(FORMATS.get("onnx"), _bump_second_gemm_weight(0.5)))
    report = run_job_and_check_failed(tmp_path / "net.pt", tmp_path)
    (art,) = report.artifacts
    assert art.route == "torchscript"
    proto = onnx.load(report.url(art.path))
    second_gemm = [n for n in proto.graph.node if n.op_type == "Gemm"][1]
    d = art.parity.first_divergence
    assert d is not None, art.parity.localisation
    assert (d.node, d.op_type, d.source_node) == (second_gemm.name, "Gemm", "linear_1")
    assert d.target == "aten.linear.default" and "no fx metadata" in art.parity.localisation
    assert d.max_abs_err > 0.01
