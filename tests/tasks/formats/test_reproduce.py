"""Reproduce scripts: each artifact's script redoes the conversion and the parity check without portq."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from portq.tasks.core.contract import Format, InputSpec, JobStatus
from portq.tasks.execution.run import run_job
from portq.tasks.state.store import Store
from torch import nn

from tests.jobs import prepare

REPO = Path(__file__).resolve().parents[3]


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
    with torch.no_grad():  # the fused fast path: converted once rewritten into plain ops
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
    assert onnx_art.route == "torchscript" and onnx_art.reproduce == "onnx/reproduce_onnx.py"
    assert onnx_art.notes == ["rewrote 1 x aten::_transformer_encoder_layer_fwd into plain ops"]
    script = fused_job.url(onnx_art.reproduce)
    text = Path(script).read_text()
    assert not re.search(r"^\s*(from|import) portq", text, re.M), "the script must not need portq"
    settings = _settings(script)
    assert (settings["recipe"], settings["opener"], settings["artifact"]) == ("onnx_torchscript", "open_onnx", "onnx")
    # the route's own modules travel with it: the rewrite, the typing and the symbolics it ran
    for definition in ("def onnx_torchscript(", "def prepare_script(", "def unfuse_graph(", "def typed_function(",
                       "def torchscript_symbolics(", "def open_onnx(", "class OutputCheck"):
        assert definition in text
    res = _run_script(script)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "by route torchscript" in res.stdout and res.stdout.rstrip().endswith("parity passed")
    assert "rewrote 1 x aten::_transformer_encoder_layer_fwd into plain ops" in res.stdout
    # every sample portq checked, at both batch sizes, every output
    assert res.stdout.count("output.hidden [") == onnx_art.parity.samples
    assert "[2x6x16]" in res.stdout and "[4x6x16]" in res.stdout


def test_script_fails_when_parity_fails(fused_job, tmp_path):
    """The script's check can fail: with zero tolerance, onnxruntime's float rounding differs from torch's."""
    onnx_art = fused_job.artifacts[0]
    strict = tmp_path / "reproduce_onnx.py"
    text = Path(fused_job.url(onnx_art.reproduce)).read_text()
    assert '"atol": 0.0001' in text and '"rtol": 0.001' in text
    strict.write_text(text.replace('"atol": 0.0001', '"atol": 0.0').replace('"rtol": 0.001', '"rtol": 0.0'))
    (tmp_path / "reproduce_inputs.npz").write_bytes((Path(fused_job.result) / "reproduce_inputs.npz").read_bytes())
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
    res = _run_script(report.url(art.reproduce))
    assert res.returncode == 0 and "parity passed" in res.stdout, res.stdout + res.stderr


class OffWhenTraced(nn.Module):
    """A linear layer whose traced copy (the torchscript route `trace`) is off by 5 in column 0 of every row.

    So 1 element in 16 of the artifact's output is wrong: elementwise parity fails, and a check on the
    0.9-quantile of the errors passes (the worst 1/16 lie above it) while one on the 0.99-quantile fails.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if torch.jit.is_tracing():
            y = y + torch.cat([torch.full_like(y[:, :1], 5.0), torch.zeros_like(y[:, 1:])], dim=1)
        return y


def _settings(script: str) -> dict:
    import json

    return json.loads(re.search(r'SETTINGS = json.loads\(r"""(.*?)"""\)', Path(script).read_text(), re.S).group(1))


@pytest.mark.parametrize("tolerance, passes", [
    ({"mode": "quantile", "quantile": 0.9}, True),
    ({"mode": "quantile", "quantile": 0.99}, False),
    ({"outputs": {"*": {"atol": 10.0}}}, True),  # a per-output override (a pattern: it must not leak to the job)
    ({"outputs": {"output": {"atol": 1.0}}}, False),
], ids=["quantile-passes", "quantile-fails", "override-passes", "override-fails"])
def test_script_checks_the_way_the_report_did(tmp_path, tolerance, passes):
    """The script passes exactly when the report did, under statistic modes and per-output overrides too."""
    torch.manual_seed(0)
    torch.save(OffWhenTraced().state_dict(), tmp_path / "off.pt")
    store = Store(str(tmp_path / "store"))
    sub = prepare([str(tmp_path / "off.pt")], store, batch="r", max_bytes=1 << 30, options={
        "inputs": [InputSpec.parse("x:float32[2,8]")], "arch": f"{__name__}:OffWhenTraced",
        "formats": [Format.torchscript], "tolerance": tolerance, "parity": {"random_samples": 2, "localise": False},
        "latency": {"warmup": 0, "runs": 1}})
    report = run_job(sub.specs[0], store)
    (art,) = report.artifacts
    assert art.route == "trace" and art.parity is not None
    (out,) = art.parity.outputs
    # the elementwise view at the fp32 default fails on the 4 bumped elements of the 64: only the mode or
    # the override decides the outcome
    assert out.max_abs_err == pytest.approx(5.0, rel=1e-3) and out.elements == 64
    assert art.parity.passed is passes and report.status is (JobStatus.succeeded if passes else JobStatus.failed)
    settings = _settings(report.url(art.reproduce))
    assert settings["tolerance"]["atol"] == 1e-4  # the job's own, whatever the overrides
    assert settings["tolerances"]["output"]["mode"] == out.tolerance.mode.value
    assert settings["tolerances"]["output"]["atol"] == out.tolerance.atol
    res = _run_script(report.url(art.reproduce))
    assert res.returncode == (0 if passes else 1), res.stdout + res.stderr
    assert res.stdout.rstrip().endswith("parity passed" if passes else "parity FAILED")
    if tolerance.get("mode") == "quantile":
        assert f"p{tolerance['quantile'] * 100:g} abs err" in res.stdout  # judged on the statistic, over all samples


@pytest.mark.parametrize("isolated", [False, True], ids=["in-process", "child-process"])
def test_inputs_are_written_once_per_job(tmp_path, monkeypatch, isolated):
    """One reproduce_inputs.npz per result folder, written before any format step, read by every script."""
    from portq.tasks.execution.isolation import ChildProcess
    from portq.tasks.formats import reproduce

    calls = []  # in this process; an isolated step's child would write into its own folder, then replace ours
    write_inputs = reproduce.write_inputs
    monkeypatch.setattr(reproduce, "write_inputs", lambda *a: calls.append(a) or write_inputs(*a))
    torch.manual_seed(0)
    torch.save(Head(5).state_dict(), tmp_path / "head.pt")
    store = Store(str(tmp_path / "store"))
    sub = prepare([str(tmp_path / "head.pt")], store, batch="r", max_bytes=1 << 30, options={
        "inputs": [InputSpec.parse("x:float32[2,5]")], "arch": f"{__name__}:Head", "arch_kwargs": {"n": 5},
        "formats": [Format.torchscript, Format.pt2], "latency": {"warmup": 0, "runs": 1}})
    report = run_job(sub.specs[0], store, isolation=ChildProcess(time_limit_s=120) if isolated else None)
    assert report.status is JobStatus.succeeded, report.error
    folder = Path(report.result)
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert [n for n in names if n.endswith(".npz")] == ["reproduce_inputs.npz"]
    assert {"torchscript/reproduce_torchscript.py", "pt2/reproduce_pt2.py"} <= set(names)
    inputs = folder / "reproduce_inputs.npz"
    assert len(calls) == 1
    # written before the steps and never again: a step's rewrite would postdate the first artifact (an isolated
    # step starts a child, so its artifact is well after; in process, file times are only jiffy-coarse)
    first = Path(report.url(report.artifacts[0].path)).stat().st_mtime_ns
    assert inputs.stat().st_mtime_ns < first if isolated else inputs.stat().st_mtime_ns <= first
    import numpy as np

    with np.load(inputs) as data:
        assert sorted(data.files) == [f"s{i}_0" for i in range(report.artifacts[0].parity.samples)]
    res = _run_script(str(folder / "pt2" / "reproduce_pt2.py"))
    assert res.returncode == 0 and res.stdout.rstrip().endswith("parity passed"), res.stdout + res.stderr


@pytest.mark.parametrize("mode, q", [("elementwise", None), ("max", None), ("mean", None), ("median", None),
                                     ("quantile", 0.9)])
def test_script_check_is_the_reports_rule(mode, q):
    """The script's OutputCheck passes exactly when parity.compare does: zero references, NaN/Inf, pooled samples.

    compare() judges through the same OutputCheck (the script carries a copy of its module); this holds the
    report's wrapping of it (shape problems, statistics, overrides) to the rule itself."""
    import numpy as np
    from portq.tasks.checks.output_check import OutputCheck
    from portq.tasks.checks.parity import compare
    from portq.tasks.core.contract import Tolerance

    rng = np.random.default_rng(0)
    outcomes = []
    for case in range(150):
        reference, actual = [], []
        for _ in range(3):
            r = rng.normal(size=(4, 6)).astype(np.float32)
            r[rng.random(r.shape) < 0.2] = 0.0  # zero references: judged on the absolute error alone
            a = r + rng.normal(scale=10.0 ** rng.uniform(-6, -2), size=r.shape).astype(np.float32)
            exact = rng.random(r.shape) < 0.3
            a[exact] = r[exact]  # exact elements, exact zeros among them
            if case % 7 == 0:
                r[0, 0] = a[0, 0] = np.nan  # matching NaNs pass
            if case % 11 == 0:
                a[1, 1] = np.inf  # a non-finite mismatch fails in every mode
            reference.append([("y", r)])
            actual.append([("y", a)])
        atol, rtol = 10.0 ** rng.uniform(-5, -2), 10.0 ** rng.uniform(-4, -1)
        report = compare(reference, actual, Tolerance(mode=mode, atol=atol, rtol=rtol, quantile=q), seed=0,
                         device="cpu")
        check = OutputCheck({"mode": mode, "atol": atol, "rtol": rtol, "q": q})
        for (_, r), (_, a) in zip((s[0] for s in reference), (s[0] for s in actual)):
            check.add(r, a)
        passed, _ = check.verdict()
        assert passed is report.outputs[0].passed, (case, mode, atol, rtol)
        outcomes.append(passed)
    assert any(outcomes) and not all(outcomes)  # both verdicts were exercised


def test_an_optimization_script_carries_its_formats_code_and_runs_its_variants_config(tmp_path):
    """An ONNX optimization's script: the base export, then the variant's recipe with its config (recorded in the
    script's settings and in the report), carrying the ONNX recipe modules and no other format's."""
    torch.manual_seed(0)
    path = tmp_path / "mlp.pt2"
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    torch.export.save(torch.export.export(mlp, (torch.randn(4, 16),)), path)
    store = Store(str(tmp_path / "store"))
    sub = prepare([str(path)], store, batch="r", max_bytes=1 << 30, options={
        "latency": {"warmup": 0, "runs": 1},
        "optimize": {"candidates": ["ort-basic", "fp16", "shape-inference"], "precisions": ["fp16"]}})
    report = run_job(sub.specs[0], store)
    arts = {a.id: a for a in report.artifacts}
    for name, config in (("onnx.ort-basic", "OrtOptimizeConfig"), ("onnx.fp16", "Fp16Config"),
                         ("onnx.shape-inference", "ShapeInferenceConfig")):
        art = arts[name]
        assert art.status.value == "succeeded" and art.parity.passed, art.error
        recorded = art.optimization.facts["config"]
        assert recorded["config"] == config and recorded["version"] == 1
        script = report.url(art.reproduce)
        text = Path(script).read_text()
        settings = _settings(script)
        assert settings["config"] == recorded and settings["transform"] == art.optimization.transform
        assert {k: v for k, v in settings["transform_opts"].items() if k in recorded} == \
            {k: v for k, v in recorded.items() if k not in ("config", "version")}
        assert "def onnx_dynamo(" in text and "def pt2_export(" not in text and "def torchscript_trace(" not in text
        res = _run_script(script)
        assert res.returncode == 0 and res.stdout.rstrip().endswith("parity passed"), res.stdout + res.stderr
        assert f"then {art.optimization.transform}" in res.stdout
    assert arts["onnx.ort-basic"].optimization.facts["config"]["level"] == "ORT_ENABLE_BASIC"
