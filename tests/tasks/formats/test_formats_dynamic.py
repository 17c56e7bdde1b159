"""Dynamic dims and opsets through run_job: the artifact really accepts other sizes, and says so in its file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from portq.tasks.core.contract import Format, InputSpec, JobStatus
from portq.tasks.execution.run import run_job
from portq.tasks.state.store import Store
from torch import nn

from tests.jobs import prepare


class Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        m = mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.embed(ids) * m).sum(1) / m.sum(1).clamp(min=1.0)
        return {"logits": self.head(pooled), "pooled": pooled}


def _run(tmp_path, path, **options):
    store = Store(str(tmp_path / "store"))
    (spec,) = prepare([str(path)], store, batch="dyn", options={"latency": {"warmup": 0, "runs": 1}, **options},
                      max_bytes=1 << 30).specs
    return run_job(spec, store)


def test_named_dims_export_dynamic_onnx_with_named_outputs(tmp_path):
    ids, mask = torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    torch.jit.save(torch.jit.trace(Pool().eval(), (ids, mask), strict=False), tmp_path / "pool.pt")
    inputs = [InputSpec.parse("ids:int64[batch=2,seq=16]{0,100}"), InputSpec.parse("mask:int64[batch=2,seq=16]{0,2}")]
    report = _run(tmp_path, tmp_path / "pool.pt", inputs=inputs, dynamic=["batch", "seq"],
                  formats=[Format.onnx, Format.torchscript])
    assert report.status is JobStatus.succeeded, report.error
    art = report.artifacts[0]
    assert art.parity.passed and art.parity.samples >= 2 and art.route == "torchscript"  # dict outputs flattened
    model = onnx.load(report.url(art.path))
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [["batch", "seq"], ["batch", "seq"]]
    assert [o.name for o in model.graph.output] == ["output.logits", "output.pooled"]
    session = ort.InferenceSession(report.url(art.path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"ids": np.zeros((5, 7), np.int64), "mask": np.ones((5, 7), np.int64)})
    assert out[0].shape == (5, 3)


def test_a_batch_of_one_still_exports_a_dynamic_batch(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2), nn.Tanh()).eval()
    program = torch.export.export(model, (torch.randn(3, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "lin.pt2")
    report = _run(tmp_path, tmp_path / "lin.pt2", inputs=[InputSpec.parse("x:float32[1,4]")], dynamic=["batch"],
                  formats=[Format.onnx, Format.pt2])
    assert report.status is JobStatus.succeeded, report.error
    onnx_art = report.artifacts[0]
    first = onnx.load(report.url(onnx_art.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert first.dim_param, "exported at batch 1, the batch came out static"
    # a draw at batch 1 and one at batch 3; the exporters traced with the batch-3 one
    assert {a.parity.samples for a in report.artifacts} == {2}


def test_a_static_program_cannot_be_made_dynamic(tmp_path):
    model = nn.Linear(4, 2).eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), tmp_path / "static.pt2")
    report = _run(tmp_path, tmp_path / "static.pt2", dynamic=["batch"])
    assert report.status is JobStatus.failed and report.failure.step == "inputs"
    assert "exported with input 'input' axis 0 fixed at 2" in report.error
    assert "torch.export.Dim('batch')" in report.error


def test_opset_is_selectable_and_recorded(tmp_path):
    torch.jit.save(torch.jit.script(nn.Linear(4, 2).eval()), tmp_path / "lin.pt")
    report = _run(tmp_path, tmp_path / "lin.pt", inputs=[InputSpec.parse("x:float32[2,4]")], opset=17)
    (art,) = report.artifacts
    assert report.status is JobStatus.succeeded and art.opset == 17 and art.route == "torchscript"
    assert [(a.route, a.error is None) for a in art.attempts][-1] == ("torchscript", True)
