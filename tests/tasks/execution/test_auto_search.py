"""`--optimize auto` searches what the user could serve instead of the source: every format that runs on the target
with its variants, the export route where another applies; it prunes what cannot win and says why."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from portq.tasks.core.contract import (
    ArtifactReport,
    ArtifactRequest,
    JobOptions,
    JobStatus,
    LatencyReport,
    ParityReport,
    StepStatus,
)
from portq.tasks.formats import FORMATS
from portq.tasks.formats.search import prune_reason
from portq.tasks.formats.selection import plan

AUTO = {"candidates": ["auto"]}


def _ids(options: dict, source_kind: str | None, target: str = "cpu") -> dict[str, str | None]:
    return {p.id: p.skip for p in plan(JobOptions.model_validate(options), target, source_kind)}


def test_auto_on_a_torchscript_source_searches_every_format_and_the_other_export_route():
    planned = _ids({"optimize": AUTO}, "torchscript")
    # the requested format's candidates, the formats auto adds (the cheap one before the compile), the route family
    assert {"onnx", "onnx.ort-all", "onnx.ort-transformer", "torchscript", "torchscript.frozen", "aoti",
            "onnx.ts2ep", "onnx.ts2ep-ort-all", "onnx.ts2ep-ort-transformer"} <= set(planned)
    order = list(planned)
    assert order.index("torchscript") < order.index("torchscript.frozen") < order.index("aoti")
    assert order.index("onnx.ts2ep") < order.index("onnx.ts2ep-ort-all")  # a family's base first
    assert planned["onnx.ts2ep-int8-dynamic"].startswith("not tried: lossy (int8)")
    assert planned["onnx.ts2ep-int8-dynamic"] is not None and planned["onnx.ts2ep"] is None
    assert "pt2" not in planned  # an ExportedProgram runs in eager PyTorch: nothing to serve instead of the source


def test_auto_adds_only_what_applies_to_the_source_and_names_widen_nothing():
    program = _ids({"optimize": AUTO}, "exported_program")
    assert "torchscript.frozen" in program and not any(i.startswith("onnx.ts2ep") for i in program)
    assert set(_ids({"optimize": AUTO}, "onnx")) <= {f"onnx.{n}" for n in FORMATS.get("onnx").variants.names()} | {
        "onnx"}  # an ONNX file only becomes ONNX
    named = _ids({"optimize": {"candidates": ["ort-all"]}}, "torchscript")
    assert set(named) == {"onnx", "onnx.ort-all"}  # named candidates: the requested formats only


def _art(id_: str, speedup: float | None, interval: tuple[float, float] | None = None, passed: bool = True,
         route: str | None = None) -> ArtifactReport:
    request = ArtifactRequest.parse(id_)
    art = ArtifactReport(id=id_, format=request.format, variant=request.variant, status=StepStatus.succeeded,
                         route=route)
    if speedup is not None:
        art.parity = ParityReport(passed=passed, atol=1e-4, rtol=1e-3, samples=1, seed=0, device="cpu",
                                  max_abs_err=0.0, max_rel_err=0.0, outputs=[])
        art.latency = LatencyReport(device="cpu", warmup=1, runs=3, p50_ms=1.0, p90_ms=1.0, p99_ms=1.0, mean_ms=1.0,
                                    source_p50_ms=1.0, source_p90_ms=1.0, source_p99_ms=1.0, source_mean_ms=1.0,
                                    speedup=speedup, speedup_interval=list(interval or (speedup, speedup)))
    return art


def _prune(id_: str, *done: ArtifactReport) -> str | None:
    return prune_reason(ArtifactRequest.parse(id_), {a.id: a for a in done})


def test_a_variant_whose_base_leaves_it_no_room_is_pruned_with_the_reason():
    slow = _art("onnx", 0.8, (0.75, 0.85), route="torchscript")
    # ort-all runs at most 1.15x its base: 0.85 * 1.15 < 1, it cannot beat the source
    reason = _prune("onnx.ort-all", slow)
    assert reason == ("pruned: its base onnx runs at 0.80x (0.75-0.85) the source's speed, and ort-all has run at most "
                      "1.15x faster than its base: at most 0.98x, which cannot beat the source (1.00x)")
    # int8 may run 4x its base: kept; the transformer fusions 2x: kept
    assert _prune("onnx.int8-dynamic", slow) is None and _prune("onnx.ort-transformer", slow) is None
    # the bar is the best so far once that beats the source: 1.1 * 2 < 2.5
    fast = _art("aoti", 2.6, (2.5, 2.7))
    assert "cannot beat aoti (at least 2.50x)" in _prune("onnx.ort-transformer", _art("onnx", 1.0, (0.9, 1.1)), fast)
    assert _prune("onnx.ort-transformer", _art("onnx", 1.0, (0.9, 1.1))) is None
    # a base that failed parity, or was not timed, is no evidence: nothing pruned
    assert _prune("onnx.ort-all", _art("onnx", 0.5, passed=False)) is None
    assert _prune("onnx.ort-all", _art("onnx", None)) is None


def test_a_pruned_family_takes_its_members_and_a_duplicate_route_is_pruned():
    pruned = _art("onnx.ts2ep", None)
    pruned.status, pruned.pruned = StepStatus.skipped, True
    assert _prune("onnx.ts2ep-int8-dynamic", pruned) == "pruned: it is made from onnx.ts2ep, which was pruned"
    # the default's ladder took the ts2ep route already: the route variant is the same export
    assert _prune("onnx.ts2ep", _art("onnx", 1.2, route="ts2ep")) == (
        "pruned: the same export as onnx, whose ladder took the ts2ep route already")
    assert _prune("onnx.ts2ep", _art("onnx", 1.2, route="torchscript")) is None


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.fixture
def no_compiler(monkeypatch):
    """AOTInductor as on a worker without a C++ compiler (and no minute-long compile in a test)."""
    aoti = FORMATS.get("aoti")
    monkeypatch.setattr(aoti, "unsupported", lambda target: "AOTInductor needs a C++ compiler (c++/g++) on the "
                                                            "worker, and none is on PATH")


@pytest.mark.slow  # 25-50 s on 2 busy cores: the ts2ep route's conversion and each candidate's paired timing
def test_auto_on_a_torchscript_source_runs_its_candidates_and_reports_what_it_pruned(tmp_path, no_compiler,
                                                                                  monkeypatch):
    from portq.tasks.execution.run import run_job
    from portq.tasks.state.store import Store

    from tests.jobs import prepare

    # variants that can never win, so the pruning is deterministic (and the test short): no headroom over their base,
    # but onnx.ts2ep-ort-all, which is made from the route variant's export
    for _, handler in FORMATS:
        for name, variant in handler.variants:
            if variant.headroom is not None:
                monkeypatch.setitem(handler.variants._items, name, dataclasses.replace(
                    variant, headroom=None if name == "ts2ep-ort-all" else 0.0))
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(Mlp().eval(), (x,)), tmp_path / "mlp.pt")
    store = Store(str(tmp_path / "store"))
    (spec,) = prepare([str(tmp_path / "mlp.pt")], store, batch="auto", options={
        "latency": {"warmup": 1, "runs": 6, "min_window_ms": 2, "max_seconds": 3}, "parity": {"localise": False},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [4, 16]}], "optimize": AUTO}).specs
    report = run_job(spec, store)
    arts = {a.id: a for a in report.artifacts}
    assert report.status is JobStatus.succeeded, report.error
    assert arts["onnx"].route == "torchscript" and arts["onnx.ts2ep"].route == "ts2ep", arts["onnx.ts2ep"].error
    assert arts["onnx.ts2ep"].parity.passed and arts["onnx.ts2ep"].requested_by == "optimize"
    assert arts["torchscript"].requested_by == "optimize" and arts["torchscript"].parity.passed
    frozen = arts["torchscript.frozen"]
    assert frozen.status is StepStatus.skipped and frozen.pruned and frozen.error.startswith(
        "pruned: its base torchscript runs at")
    assert arts["aoti"].status is StepStatus.skipped and "needs a C++ compiler" in arts["aoti"].error
    assert all(a.error.startswith("pruned") for a in report.artifacts if a.pruned)
    made = arts["onnx.ts2ep-ort-all"]  # an optimization of the route variant's export, not the default's
    assert made.status is StepStatus.succeeded and made.parity.passed, made.error
    assert made.optimization.base == "onnx.ts2ep" and made.route == "ts2ep"
    pruned = {"onnx.ort-extended", "onnx.ort-all", "onnx.ts2ep-ort-extended", "torchscript.frozen"}
    assert pruned <= {a.id for a in report.artifacts if a.pruned}
    text = (Path(report.result) / "report.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("- optimize: tried"))
    assert all(p in line.split("pruned")[1] for p in pruned) and "onnx.ts2ep-ort-all" in line.split("pruned")[0]
    saved = json.loads((Path(report.result) / "report.json").read_text())
    assert {a["id"] for a in saved["artifacts"] if a["pruned"]} == {a.id for a in report.artifacts if a.pruned}
    assert (report.best is None) == bool(report.best_note)  # a pick, or the word that nothing beat the source


def test_a_candidate_auto_added_that_fails_does_not_fail_the_job(tmp_path):
    """auto's own candidates are data points of its search; a requested artifact, or a named candidate, that fails
    still fails the job."""
    from portq.tasks.execution.run import _searched
    from portq.tasks.state.store import Store

    from tests.jobs import prepare

    path = tmp_path / "m.pt"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(Mlp().eval(), (torch.randn(2, 16),)), path)
    store = Store(str(tmp_path / "store"))
    (auto,) = prepare([str(path)], store, batch="a", options={"optimize": AUTO}).specs
    (named,) = prepare([str(path)], store, batch="n", options={"optimize": {"candidates": ["ort-all"]}}).specs
    candidate, requested = _art("onnx.ts2ep-ort-all", None), _art("onnx", None)
    candidate.requested_by = "optimize"
    assert _searched(auto, candidate) and not _searched(auto, requested) and not _searched(named, candidate)
