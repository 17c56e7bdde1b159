"""--optimize end to end in process: candidates per target, lossy ones only with their precision, the fastest
that passes picked, an overflowing fp16 variant caught by parity and repaired, calibration checked first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from portq.tasks.core.contract import JobStatus, StepStatus
from portq.tasks.execution.run import run_job
from portq.tasks.state.store import Store

from tests.jobs import prepare
from tests.models_optimize import Fp16Overflow, ResidualCNN, randomize_batchnorm

FAST = {"latency": {"warmup": 1, "runs": 6, "min_window_ms": 2, "max_seconds": 5}}


def _save(tmp_path: Path, name: str, model: torch.nn.Module, x: torch.Tensor) -> Path:
    path = tmp_path / f"{name}.pt2"
    torch.export.save(torch.export.export(model.eval(), (x,)), path)
    return path


@pytest.fixture(autouse=True)
def _no_aoti_compile(monkeypatch):
    """auto adds AOTInductor where a compiler is; its compile takes most of a minute here, so these tests run as on a
    worker without one (tests/tasks/execution/test_auto_search.py covers the search)."""
    from portq.tasks.formats import FORMATS

    monkeypatch.setattr(FORMATS.get("aoti"), "unsupported", lambda target: "no C++ compiler (in this test)")


def _run(path: Path, store: Store, **options):
    (spec,) = prepare([str(path)], store, batch="opt", options={**FAST, **options}).specs
    return run_job(spec, store)


def test_auto_tries_the_targets_candidates_and_picks_the_fastest_that_passes(tmp_path):
    torch.manual_seed(0)
    path = _save(tmp_path, "cnn", randomize_batchnorm(ResidualCNN(width=8, blocks=1)), torch.randn(2, 3, 16, 16))
    store = Store(str(tmp_path / "store"))
    report = _run(path, store, optimize={"candidates": ["auto"]})
    assert report.status is JobStatus.succeeded, report.error
    arts = {a.id: a for a in report.artifacts}
    assert {"onnx", "onnx.ort-extended", "onnx.ort-all"} <= set(arts)
    assert arts["onnx.ort-extended"].requested_by == "optimize" and arts["onnx"].requested_by == "request"
    for name in ("onnx.ort-extended", "onnx.ort-all"):
        a = arts[name]
        assert a.status is StepStatus.succeeded and a.parity.passed, a.error
        assert a.optimization.base == "onnx" and a.optimization.lossless and a.route == arts["onnx"].route
        assert a.optimization.facts["nodes_before"] >= a.optimization.facts["nodes_after"]
        assert a.path == f"{name}/model.onnx" and Path(report.url(a.reproduce)).is_file()
    # the levels did their work: Conv+ReLU fused at extended, fused operators at all (NCHWc convolutions on x86)
    assert arts["onnx.ort-extended"].optimization.facts["fused_ops"].get("com.microsoft:FusedConv", 0) > 0
    assert arts["onnx.ort-all"].optimization.facts["fused_ops"], arts["onnx.ort-all"].optimization.facts
    # a CNN is not transformer-like: that candidate says so instead of failing
    assert arts["onnx.ort-transformer"].status is StepStatus.skipped
    assert "not transformer-like" in arts["onnx.ort-transformer"].error
    # lossy candidates are not tried without their precision, and the report says how to allow them
    for lossy in ("onnx.int8-dynamic", "onnx.int8-static"):
        assert arts[lossy].status is StepStatus.skipped and "--precision int8" in arts[lossy].error
    passing = [a for a in report.artifacts if a.parity is not None and a.parity.passed and a.latency
               and a.latency.speedup > 1 and a.latency.speedup_interval[1] > 1]
    if not passing:  # nothing beat the source (a busy machine): no pick, and the report says so
        assert report.best is None and report.best_note.startswith("no faster artifact than the source")
        return
    # the best is the most surely fast (the highest lower bound), or one tied with it (intervals overlap), by the rule
    fastest = max(passing, key=lambda a: (a.latency.speedup_interval[0], a.latency.speedup))
    low, high = fastest.latency.speedup_interval
    tied = {a.id for a in passing if a.latency.speedup_interval[0] <= high and low <= a.latency.speedup_interval[1]}
    assert report.best in tied and arts[report.best].best
    assert (len(tied) > 1) == ("tied with" in (arts[report.best].best_note or ""))


def test_lossy_variants_run_only_with_their_precision_and_are_judged_by_it(tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    path = _save(tmp_path, "mlp", mlp, torch.randn(4, 32))
    store = Store(str(tmp_path / "store"))
    report = _run(path, store, optimize={"candidates": ["int8-dynamic", "int8-static"], "precisions": ["int8"]})
    arts = {a.id: a for a in report.artifacts}
    for name in ("onnx.int8-dynamic", "onnx.int8-static"):
        a = arts[name]
        assert a.status is StepStatus.succeeded, a.error
        assert a.precision.value == "int8" and a.parity.precision.value == "int8" and a.parity.mode.value == "quantile"
        assert not a.optimization.lossless and a.parity.max_abs_err > 0
    static = arts["onnx.int8-static"]
    assert any("calibrated on the job's own" in n for n in static.optimization.facts["notes"])
    assert static.optimization.facts["calibration_samples"] == static.parity.samples  # every parity sample, used
    assert (Path(report.url(static.path)).parent / "calibration.npz").is_file()


def test_an_overflowing_fp16_variant_is_caught_never_picked_and_repaired(tmp_path):
    torch.manual_seed(0)
    path = _save(tmp_path, "overflow", Fp16Overflow(), torch.randn(4, 32))
    store = Store(str(tmp_path / "store"))
    report = _run(path, store, optimize={"candidates": ["fp16"], "precisions": ["fp16"]})
    arts = {a.id: a for a in report.artifacts}
    fp16, mixed = arts["onnx.fp16"], arts["onnx.fp16-mixed"]
    assert fp16.status is StepStatus.succeeded and not fp16.parity.passed  # converted, and parity caught it
    assert any(o.nonfinite_mismatches or o.nan_artifact or o.inf_artifact for o in fp16.parity.outputs)
    assert not fp16.best and report.best != "onnx.fp16"
    assert mixed.requested_by == "repair of onnx.fp16" and mixed.parity.passed, mixed.error
    kept = mixed.optimization.facts["node_block_list"]
    assert kept and mixed.optimization.facts["passed"]
    assert mixed.latency.p50_ms > 0  # what the repair cost is measured like any artifact
    text = Path(report.result, "report.md").read_text()
    assert "kept in float32" in text and kept[0] in text
    assert report.status is JobStatus.failed  # the plain fp16 artifact failed parity: the job says so


class Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_calibration_that_does_not_fit_the_inputs_is_refused_before_any_artifact(tmp_path):
    torch.manual_seed(0)
    path = _save(tmp_path, "head", Head(), torch.randn(4, 32))
    bad = tmp_path / "calib.npz"
    np.savez(bad, x=np.zeros((4, 31), np.float32))
    store = Store(str(tmp_path / "store"))
    (spec,) = prepare([str(path)], store, batch="cal", calibration=[bad],
                      options={**FAST, "optimize": {"candidates": ["int8-static"], "precisions": ["int8"]}}).specs
    report = run_job(spec, store)
    assert report.status is JobStatus.failed and report.artifacts == []
    assert report.failure.step == "calibration" and report.failure.file == str(bad)
    assert "calibration input x has shape [4, 31], the model's is [4, 32]" in report.error


def test_when_nothing_beats_the_source_the_report_says_so():
    from portq.tasks.core.contract import ArtifactReport, JobReport, LatencyReport, ParityReport
    from portq.tasks.reports.content import job_markdown, mark_best, no_pick_note

    lat = LatencyReport(device="cpu", warmup=1, runs=3, p50_ms=2.0, p90_ms=2.0, p99_ms=2.0, mean_ms=2.0,
                        source_p50_ms=1.0, source_p90_ms=1.0, source_p99_ms=1.0, source_mean_ms=1.0, speedup=0.5)
    parity = ParityReport(passed=True, atol=1e-4, rtol=1e-3, samples=1, seed=0, device="cpu", max_abs_err=0.0,
                          max_rel_err=0.0, outputs=[])
    art = ArtifactReport(id="onnx", format="onnx", status=StepStatus.succeeded, parity=parity, latency=lat)
    assert mark_best([art]) is None
    text = job_markdown(JobReport(job_id="j", batch="b", model="m", source="m.pt", target="cpu",
                                  status=JobStatus.succeeded, artifacts=[art], best_note=no_pick_note([art])))
    assert ("best pick: **none: no faster artifact than the source: the fastest that passed parity, onnx, runs at "
            "0.50x the source's speed; serve the source model**") in text
    assert "slower than the source" in text


@pytest.mark.parametrize("args, message", [
    (["--optimize", "turbo"], "--optimize turbo: no such optimization variant for onnx; known: auto, fp16, "),
    (["--optimize", "auto", "--precision", "bf16"], "--precision bf16: no optimization variant of onnx computes in "
                                                    "bf16 on cpu"),
    (["--precision", "fp64"], "--precision 'fp64' is not one of fp16, bf16, int8"),
    (["--calibration", "/nonexistent/calib"], "--calibration /nonexistent/calib: no such file or directory"),
])
def test_bad_optimization_options_are_refused_before_work_starts(example_models, tmp_path, args, message):
    from tests.conftest import run_cli

    res = run_cli("submit", str(example_models["mlp"]), *args, env={"PORTQ_STORE": str(tmp_path / "s")})
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "s" / "inputs").exists()  # nothing was uploaded


def test_half_precision_torch_variants_on_the_cpu_run_or_say_why_not(tmp_path):
    """pt2.fp16 / pt2.bf16 under `--optimize auto --precision fp16,bf16`: tried where this CPU computes that
    precision natively, skipped with the reason where it does not; a variant that runs keeps fp32 I/O and is
    held to its precision's tolerance."""
    from portq.tasks.formats.hardware import cpu_has_native_bf16, cpu_has_native_fp16

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    path = _save(tmp_path, "mlp", mlp, torch.randn(4, 32))
    store = Store(str(tmp_path / "store"))
    report = _run(path, store, artifacts=[{"format": "pt2"}],
                  optimize={"candidates": ["auto"], "precisions": ["fp16", "bf16"]})
    assert report.status is JobStatus.succeeded, report.error
    arts = {a.id: a for a in report.artifacts}
    for precision, native in (("fp16", cpu_has_native_fp16()), ("bf16", cpu_has_native_bf16())):
        a = arts[f"pt2.{precision}"]
        if native:
            assert a.status is StepStatus.succeeded and a.parity.passed, a.error
            assert a.precision.value == precision and a.parity.precision.value == precision
            assert a.parity.max_abs_err > 0  # it did compute in half precision
        else:
            assert a.status is StepStatus.skipped and f"no native {precision}" in a.error, a.error
