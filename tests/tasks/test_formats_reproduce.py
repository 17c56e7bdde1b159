"""Reproduce scripts: each artifact's script redoes the conversion and the parity check without portq."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from portq.tasks.contract import Format, InputSpec, JobStatus
from portq.tasks.job import run_job
from portq.tasks.store import Store
from portq.tasks.submission import prepare
from torch import nn

REPO = Path(__file__).resolve().parents[2]


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.enc(self.embed(ids))
        return {"hidden": h, "pooled": h.mean(1)}


def _run_script(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    # no portq on the path: the script must stand alone (the arch module is found through PYTHONPATH)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, path, *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd="/")


@pytest.fixture
def fused_job(tmp_path):
    with torch.no_grad():  # the fused fast path: only the decomposing route converts it
        traced = torch.jit.trace(Encoder().eval(), (torch.randint(0, 50, (2, 6)),), strict=False)
    torch.jit.save(traced, tmp_path / "enc.pt")
    store = Store(str(tmp_path / "store"))
    sub = prepare([str(tmp_path / "enc.pt")], store, batch="r", max_bytes=1 << 30, options={
        "inputs": [InputSpec.parse("ids:int64[batch=2,6]{0,50}")], "dynamic": ["batch"],
        "formats": [Format.onnx, Format.pt2], "latency": {"warmup": 0, "runs": 1}})
    return run_job(sub.specs[0], store)


def test_onnx_script_redoes_the_route_that_worked(fused_job):
    assert fused_job.status is JobStatus.succeeded, fused_job.error
    onnx_art = fused_job.artifacts[0]
    assert onnx_art.route == "ts2ep_decomposed" and onnx_art.reproduce.endswith("reproduce_onnx.py")
    text = Path(onnx_art.reproduce).read_text()
    assert not re.search(r"^\s*(from|import) portq", text, re.M), "the script must not need portq"
    assert "onnx_ts2ep_decomposed(source, example, cli.out, opts)" in text
    res = _run_script(onnx_art.reproduce)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "by route ts2ep_decomposed" in res.stdout and res.stdout.rstrip().endswith("parity passed")
    # every sample portq checked, at both batch sizes, every output
    assert res.stdout.count("output.hidden [") == onnx_art.parity.samples
    assert "[2x6x16]" in res.stdout and "[4x6x16]" in res.stdout


def test_script_fails_when_parity_fails(fused_job, tmp_path):
    """The script's check can fail: with zero tolerance, onnxruntime's float rounding differs from torch's."""
    onnx_art = fused_job.artifacts[0]
    strict = tmp_path / "reproduce_onnx.py"
    text = Path(onnx_art.reproduce).read_text()
    assert '"atol": 0.0001' in text and '"rtol": 0.001' in text
    strict.write_text(text.replace('"atol": 0.0001', '"atol": 0.0').replace('"rtol": 0.001', '"rtol": 0.0'))
    (tmp_path / "reproduce_inputs.npz").write_bytes((Path(onnx_art.reproduce).parent / "reproduce_inputs.npz")
                                                    .read_bytes())
    res = _run_script(str(strict), "--out", str(tmp_path / "strict.onnx"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL" in res.stdout and res.stdout.rstrip().endswith("parity FAILED")


class Head(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(n, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).softmax(-1)


def test_state_dict_script_rebuilds_the_arch(tmp_path):
    torch.manual_seed(0)
    torch.save({"model_state_dict": Head(5).state_dict()}, tmp_path / "ckpt.pt")
    store = Store(str(tmp_path / "store"))
    sub = prepare([str(tmp_path / "ckpt.pt")], store, batch="r", max_bytes=1 << 30, options={
        "inputs": [InputSpec.parse("x:float32[2,5]")], "arch": f"{__name__}:Head", "arch_kwargs": {"n": 5},
        "formats": [Format.torchscript], "latency": {"warmup": 0, "runs": 1}})
    report = run_job(sub.specs[0], store)
    (art,) = report.artifacts
    assert report.status is JobStatus.succeeded and art.route == "trace"
    res = _run_script(art.reproduce)
    assert res.returncode == 0 and "parity passed" in res.stdout, res.stdout + res.stderr
