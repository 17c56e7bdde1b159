"""The ONNX ladder checks what it ships: a route whose artifact onnxruntime cannot load is left like a failed one
and the next route tried; a Mamba-style block whose scripted chunk count feeds `repeat` (a Tile whose repeats
were not a 1-D int64 tensor) and a Mixtral-style router that counts tokens per expert with `torch.histc` convert,
with parity, through the embedded default."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from portq.tasks.checks.runners import call
from portq.tasks.core.contract import JobStatus, StepStatus
from portq.tasks.execution.run import run_job
from portq.tasks.formats import FORMATS, ExportRequest, RoutesExhausted
from portq.tasks.formats.base import Route
from portq.tasks.sources.loading import LoadedModel
from portq.tasks.state.store import Store
from torch import nn

from tests.jobs import prepare

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
FAST = {"latency": {"warmup": 1, "runs": 3, "min_window_ms": 1, "max_seconds": 2}}


class MambaBlock(nn.Module):
    """A Mamba-style block: gated input projection, selective scan over time with input-dependent step sizes,
    and the state matrix tiled over the batch and the scan's chunks. Scripted, the chunk count
    `math.ceil(length / chunk)` is computed in floats, and the TorchScript exporter's built-in `repeat` handed it to
    Tile as is: a Concat of mixed types, or repeats of type float that onnxruntime refuses."""

    def __init__(self, d: int = 16, n: int = 4, chunk: int = 4) -> None:
        super().__init__()
        self.n, self.chunk = n, chunk
        self.inp = nn.Linear(d, 2 * d)
        self.a_log = nn.Parameter(torch.randn(d, n) * 0.1)
        self.x_proj = nn.Linear(d, 2 * n + 1)
        self.dt_proj = nn.Linear(1, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        u, z = self.inp(x).chunk(2, -1)
        u = F.silu(u)
        a = -torch.exp(self.a_log)
        dt, bm, cm = self.x_proj(u).split([1, self.n, self.n], -1)
        dt = F.softplus(self.dt_proj(dt))
        da = torch.exp(dt.unsqueeze(-1) * a)
        db = dt.unsqueeze(-1) * bm.unsqueeze(2)
        chunks = math.ceil(length / self.chunk)
        a_tiled = a.unsqueeze(0).repeat(b, chunks, 1)[:, :d]  # (b, d, n)
        h = torch.zeros(b, d, self.n)
        ys = []
        for t in range(length):
            h = da[:, t] * h + db[:, t] * u[:, t].unsqueeze(-1) + 0.01 * a_tiled
            ys.append((h * cm[:, t].unsqueeze(1)).sum(-1))
        return self.out(torch.stack(ys, 1) * F.silu(z))


class HistcRouter(nn.Module):
    """A Mixtral-style top-2 MoE layer whose router reports the tokens each expert got, counted with torch.histc."""

    def __init__(self, d: int = 16, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.experts_n, self.k = experts, k
        self.gate = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
                                     for _ in range(experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, chosen = torch.topk(self.gate(x).softmax(-1), self.k, -1)
        load = torch.histc(chosen.float(), bins=self.experts_n, min=0, max=self.experts_n - 1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            out = out + (chosen == i).float().mul(weights).sum(-1, keepdim=True) * expert(x)
        return out, load / chosen.numel()


def _convert(tmp_path: Path, name: str, save: Any, x: torch.Tensor, formats: list[str] | None = None) -> Any:
    path = save(tmp_path / name)
    np.savez(path.with_suffix(".npz"), x.numpy())
    store = Store(str(tmp_path / "store"))
    (spec,) = prepare([str(path)], store, batch="ladder",
                      options={**FAST, "formats": formats or ["onnx"]}).specs
    return run_job(spec, store)


def _script(module: nn.Module) -> Any:
    def save(stem: Path) -> Path:
        path = stem.with_suffix(".pt")
        torch.jit.save(torch.jit.script(module.eval()), str(path))
        return path
    return save


def test_a_mamba_block_whose_repeat_count_is_computed_in_floats_converts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    report = _convert(tmp_path, "mamba", _script(MambaBlock()), torch.randn(2, 6, 16))
    assert report.status is JobStatus.succeeded, report.error
    (art,) = report.artifacts
    assert art.route == "torchscript" and art.parity.passed, art.error
    import onnx

    graph = onnx.load(report.url(art.path)).graph
    assert any(n.op_type == "Tile" for n in graph.node)


def test_a_moe_router_counting_with_histc_converts_as_torchscript_and_as_a_program(tmp_path: Path) -> None:
    """The traced router converts by the TorchScript exporter itself (with portq's histc, not by a later route), with
    parity through the embedded default; its ExportedProgram converts by dynamo, which decomposes histc."""
    torch.manual_seed(0)
    model, x = HistcRouter().eval(), torch.randn(2, 6, 16)

    def traced(stem: Path) -> Path:
        path = stem.with_suffix(".pt")
        with torch.no_grad():
            torch.jit.save(torch.jit.trace(model, (x,)), str(path))
        return path

    report = _convert(tmp_path, "router", traced, x)
    assert report.status is JobStatus.succeeded, report.error
    (art,) = report.artifacts
    assert art.status is StepStatus.succeeded and art.parity.passed, art.error
    assert art.route == "torchscript", [(a.route, a.error) for a in art.attempts]

    program = torch.export.export(model, (x,))
    source = LoadedModel(kind="exported_program", module=program.module(), program=program, input_names=["x"])
    (tmp_path / "ep").mkdir()
    req = ExportRequest(model=source, args=(x,), input_names=["x"], output_names=["out", "load"], dynamic={},
                        out_dir=tmp_path / "ep", device="cpu", display="router.pt2")
    FORMATS.get("onnx").setup()  # the dynamo exporter's translation table, cached as a step process has it
    result = FORMATS.get("onnx").export(req)
    assert result.route == "dynamo"
    got = call(FORMATS.get("onnx").open_runner(result.path, "cpu"), [x.numpy()])
    with torch.no_grad():
        for (_, g), e in zip(got, model(x)):
            np.testing.assert_allclose(g, e.numpy(), atol=1e-5, rtol=1e-4)


def test_histc_symbolic_counts_as_torch_does(tmp_path: Path) -> None:
    """Edges, values outside the range, NaN (not counted in a given range; torch refuses it in the data's range),
    and min == max (the data's range, widened when the data is constant) give torch's counts exactly."""

    class Histograms(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return torch.histc(x, bins=5, min=-1.0, max=1.0), torch.histc(x[1:], bins=7), torch.histc(x[3:], bins=3)

    x = torch.randn(4, 50)
    x[0, :6] = torch.tensor([-1.0, 1.0, -1.5, 1.5, 0.2, float("nan")])
    x[1, :2] = torch.tensor([0.0, 0.0])
    script = torch.jit.trace(Histograms(), (x,))
    source = LoadedModel(kind="torchscript", module=script, script=script, input_names=["x"])
    req = ExportRequest(model=source, args=(x,), input_names=["x"], output_names=["a", "b", "c"], dynamic={},
                        out_dir=tmp_path, device="cpu", display="histc.pt")
    result = FORMATS.get("onnx").export(req, only=["torchscript"])
    runner = FORMATS.get("onnx").open_runner(result.path, "cpu")
    for sample in (x, torch.randn(4, 50) * 3, torch.full((4, 50), 0.5)):
        got = call(runner, [sample.numpy()])
        expected = Histograms()(sample)
        for (_, g), e in zip(got, expected):
            np.testing.assert_array_equal(g, e.numpy())


# ======================================================================================= fall through on load
def _tile_with_2d_repeats(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """A route that writes a graph onnx's checker passes and onnxruntime refuses: Tile's repeats as a (1, 2) int64
    tensor, what the issue's mamba.pt got ('Repeats' input must be 1D tensor of type int64)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info(opts["input_names"][0], TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info(opts["output_names"][0], TensorProto.FLOAT, None)
    repeats = helper.make_tensor("repeats", TensorProto.INT64, [1, 2], [1, 1])
    graph = helper.make_graph([helper.make_node("Tile", [x.name, "repeats"], [y.name], name="Tile_244")], "g", [x],
                              [y], [repeats])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_a_route_whose_artifact_onnxruntime_cannot_load_falls_through_to_the_next(tmp_path: Path) -> None:
    onnx_handler = FORMATS.get("onnx")
    handler = dataclasses.replace(onnx_handler, routes=[Route("tile_2d", _tile_with_2d_repeats),
                                                        onnx_handler.route("torchscript")])
    script = torch.jit.script(Doubler())
    source = LoadedModel(kind="torchscript", module=script, script=script, input_names=["x"])
    x = torch.randn(2, 3)

    def request(out: Path) -> ExportRequest:
        out.mkdir()
        return ExportRequest(model=source, args=(x,), input_names=["x"], output_names=["y"], dynamic={},
                             out_dir=out, device="cpu", display="mamba.pt")

    req = request(tmp_path / "ladder")
    result = handler.export(req)
    assert result.route == "torchscript"
    (_, got), = call(handler.open_runner(result.path, "cpu"), [x.numpy()])
    np.testing.assert_allclose(got, 2 * x.numpy())
    left, taken = req.attempts
    assert (left.route, taken.route, taken.error) == ("tile_2d", "torchscript", None)
    assert left.error.startswith("onnxruntime ") and "cannot load the graph route tile_2d wrote at its Tile node " \
        "Tile_244" in left.error and "'Repeats' input must be 1D tensor of type int64" in left.error, left.error

    # with no route left, the failure names the route, the node and what to try
    req = request(tmp_path / "alone")
    with pytest.raises(RoutesExhausted) as failed:
        dataclasses.replace(onnx_handler, routes=[Route("tile_2d", _tile_with_2d_repeats)]).export(req)
    message = failed.value.message
    assert "[step export:onnx, file mamba.pt] could not convert mamba.pt to onnx: tried 1 route(s) (tile_2d: " \
           "onnxruntime" in message and "Tile node Tile_244" in message, message
    assert "a later route may write it differently, else convert to torchscript or pt2" in message, message
    assert not (tmp_path / "alone" / "model.onnx").exists()  # the file it refused is not left as an artifact
