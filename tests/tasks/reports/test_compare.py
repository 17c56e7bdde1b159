"""`portq compare`'s rules on synthetic reports: the latency noise rule, parity, conversion, matching, bad input."""

import json

import jsonschema
import pytest
from portq.tasks.core.contract import (
    BUSY_NOTE,
    ArtifactReport,
    BatchJob,
    BatchReport,
    CompareRules,
    Format,
    JobStatus,
    LatencyReport,
    ParityReport,
    StepStatus,
    Target,
    Timing,
    Verdict,
)
from portq.tasks.core.errors import UsageError
from portq.tasks.core.schema_files import SCHEMA_DIR
from portq.tasks.reports.compare import compare, comparison_markdown, judge_latency, judge_parity, timing_range


def timing(windows, *, stable=True, fastest=None, runs_per_window=10):
    p50 = sorted(windows)[len(windows) // 2]
    return Timing(runs=runs_per_window * len(windows), windows=len(windows), window_runs=runs_per_window,
                  window_medians_ms=windows, stable=stable,
                  spread=(max(windows) - min(windows)) / min(windows), mean_ms=p50, std_ms=0.05 * p50,
                  min_ms=fastest if fastest is not None else 0.95 * min(windows), p50_ms=p50, p90_ms=p50, p95_ms=p50,
                  p99_ms=p50, max_ms=1.2 * max(windows), throughput_per_s=1000 / p50)


def latency(t, notes=()):
    return LatencyReport(device="cpu", warmup=5, runs=t.runs, p50_ms=t.p50_ms, p90_ms=t.p90_ms, p99_ms=t.p99_ms,
                         mean_ms=t.mean_ms, source_p50_ms=1.0, source_p90_ms=1.0, source_p99_ms=1.0,
                         source_mean_ms=1.0, speedup=1.0 / t.p50_ms, stable=t.stable, artifact=t, source=t,
                         notes=list(notes))


BUSY = f"{BUSY_NOTE} when the source was timed (load average 7.1 on 2 CPUs): latencies may be inflated"
THRESHOLD = 0.10


# --------------------------------------------------------------------------------------- the noise rule


def test_overlapping_windows_are_not_a_regression():
    """+19% p50, beyond the threshold, but the window ranges overlap: within the noise."""
    result = judge_latency(latency(timing([1.0, 1.05, 1.2])), latency(timing([1.1, 1.25, 1.3])), THRESHOLD)
    assert result.verdict is Verdict.unchanged and "within the noise" in result.reason
    assert result.change == pytest.approx(0.2 / 1.05, rel=1e-6)


def test_a_clear_shift_beyond_the_noise_is_a_regression():
    result = judge_latency(latency(timing([1.0, 1.02, 1.04])), latency(timing([1.3, 1.32, 1.35])), THRESHOLD)
    assert result.verdict is Verdict.regression and "no overlap" in result.reason
    assert result.baseline_range_ms == [1.0, 1.04] and result.new_range_ms == [1.3, 1.35]


def test_a_small_shift_with_tight_windows_stays_under_the_threshold():
    """Non-overlapping windows but only +5%: the relative threshold must be exceeded too."""
    result = judge_latency(latency(timing([1.0, 1.0, 1.01])), latency(timing([1.05, 1.05, 1.06])), THRESHOLD)
    assert result.verdict is Verdict.unchanged and "within the 10% threshold" in result.reason


def test_an_unstable_new_measurement_is_inconclusive():
    result = judge_latency(latency(timing([1.0, 1.02, 1.04])),
                           latency(timing([1.1, 1.4, 1.9], stable=False)), THRESHOLD)
    assert result.verdict is Verdict.inconclusive and "unstable" in result.reason
    assert result.new_disturbed and not result.baseline_disturbed


def test_a_busy_machine_makes_a_slowdown_inconclusive():
    """Its windows sit 50% higher, but its fastest run is within 10% of the baseline's windows."""
    result = judge_latency(latency(timing([1.0, 1.02, 1.04])),
                           latency(timing([1.5, 1.52, 1.55], fastest=1.08), [BUSY]), THRESHOLD)
    assert result.verdict is Verdict.inconclusive and "the machine was busy" in result.reason
    assert "rerun it" in result.reason


def test_a_disturbed_slowdown_counts_only_when_even_its_fastest_run_is_slower():
    """Interference only adds time: when every run, the fastest included, is far above the baseline's windows,
    the disturbance cannot explain the change."""
    result = judge_latency(latency(timing([1.0, 1.02, 1.04])),
                           latency(timing([9.0, 12.0, 15.0], stable=False, fastest=8.0), [BUSY]), THRESHOLD)
    assert result.verdict is Verdict.regression and "even its fastest run (8 ms)" in result.reason


def test_a_disturbed_baseline_does_not_hide_a_slowdown_it_worked_against():
    result = judge_latency(latency(timing([1.0, 1.02, 1.04]), [BUSY]), latency(timing([1.3, 1.32, 1.35])),
                           THRESHOLD)
    assert result.verdict is Verdict.regression and result.baseline_disturbed


def test_improvements_mirror_regressions():
    faster = judge_latency(latency(timing([2.0, 2.05, 2.1])), latency(timing([1.0, 1.02, 1.04])), THRESHOLD)
    assert faster.verdict is Verdict.improvement
    disturbed_baseline = judge_latency(latency(timing([2.0, 2.05, 2.1], stable=False, fastest=1.0)),
                                       latency(timing([1.0, 1.02, 1.04])), THRESHOLD)
    assert disturbed_baseline.verdict is Verdict.inconclusive


def test_identical_measurements_are_unchanged_even_when_unstable():
    """A cache hit serves the same report: no change at all, whatever the measurement's quality."""
    t = latency(timing([1.0, 1.5, 2.5], stable=False), [BUSY])
    assert judge_latency(t, t, THRESHOLD).verdict is Verdict.unchanged


def test_the_range_covers_the_windows_the_p50_is_taken_over():
    # 5 windows timed, the statistics over the last 3 (a stable measurement keeps only those)
    t = timing([3.0, 2.0, 1.0, 1.02, 1.04]).model_copy(update={"runs": 30})
    assert timing_range(t) == (1.0, 1.04)
    one_window = t.model_copy(update={"window_medians_ms": [1.0], "runs": 100, "window_runs": 100,
                                      "std_ms": 0.5, "p50_ms": 1.0})
    low, high = timing_range(one_window)  # p50 +- 1.96 std / sqrt(runs)
    assert (low, high) == pytest.approx((1.0 - 0.098, 1.0 + 0.098))


# --------------------------------------------------------------------------------------------- parity


def parity(passed=True, err=1e-6, atol=1e-4):
    return ParityReport(passed=passed, atol=atol, rtol=1e-3, samples=3, seed=0, device="cpu", max_abs_err=err,
                        max_rel_err=err, outputs=[])


@pytest.mark.parametrize("base, new, verdict, phrase", [
    (parity(), parity(passed=False, err=1e-2), Verdict.regression, "parity now fails"),
    (parity(passed=False, err=1e-2), parity(), Verdict.improvement, "parity passes now"),
    (parity(err=1e-7), parity(err=5e-5), Verdict.regression, "parity error grew 50x"),
    (parity(err=1e-6), parity(err=9e-6), Verdict.unchanged, "parity passes"),
    (parity(err=0.0), parity(err=1e-9), Verdict.unchanged, "parity passes"),  # 0 counts as 1% of atol
    (parity(err=5e-5), parity(err=1e-7), Verdict.improvement, "parity error shrank"),
])
def test_parity_rules(base, new, verdict, phrase):
    result = judge_parity(base, new, 10.0)
    assert result.verdict is verdict and phrase in result.reason


# ------------------------------------------------------------------------------------ batches and rows


def artifact(ms=1.0, *, status=StepStatus.succeeded, err=1e-6, passed=True, notes=(), id_="onnx", fastest=None):
    fmt, _, variant = id_.partition(".")
    ok = status is StepStatus.succeeded
    return ArtifactReport(id=id_, format=Format(fmt), variant=variant or "default", status=status,
                          error=None if ok else "export failed: unsupported operator",
                          parity=parity(passed, err) if ok else None,
                          latency=latency(timing([ms, ms * 1.01, ms * 1.02], fastest=fastest), notes) if ok else None)


def job(model, *arts, status=None, source=None, cached=False, error=None):
    if status is None:
        status = JobStatus.succeeded if all(a.status is StepStatus.succeeded for a in arts) and arts else \
            JobStatus.failed
    return BatchJob(job_id=f"j-{model}", model=model, source=source or f"/models/{model}.pt", target=Target.cpu,
                    status=status, cached=cached, error=error, artifacts=list(arts))


def batch(name, *jobs, store="/store"):
    return BatchReport(batch=name, store=store, counts={"total": len(jobs)}, jobs=list(jobs))


def test_only_what_changed_regresses_and_the_document_validates():
    base = batch("n1", job("a", artifact(1.0)), job("b", artifact(1.0)), job("c", artifact(1.0)),
                 job("gone", artifact(1.0)))
    new = batch("n2", job("a", artifact(1.0), cached=True), job("b", artifact(8.0)), job("c", artifact(1.0)),
                job("fresh", artifact(1.0), source="/models/fresh.pt"))
    c = compare(base, new, series="nightly")
    verdicts = {(r.model, r.artifact): r.verdict for r in c.rows}
    assert verdicts == {("a", "onnx"): Verdict.unchanged, ("b", "onnx"): Verdict.regression,
                        ("c", "onnx"): Verdict.unchanged, ("gone", None): Verdict.removed,
                        ("fresh", None): Verdict.added}
    assert c.regressed and c.counts["regression"] == 1 and c.series == "nightly"
    assert next(r for r in c.rows if r.model == "a").cached
    jsonschema.validate(c.model_dump(mode="json"), json.loads((SCHEMA_DIR / "comparison.v1.json").read_text()))
    md = comparison_markdown(c)
    assert md.startswith("# portq compare n1 -> n2") and "**REGRESSED: 1 regression" in md


def test_conversion_failures_and_fixes():
    base = batch("n1", job("a", artifact(), artifact(id_="pt2")), job("b", artifact(status=StepStatus.failed)),
                 job("c", artifact()), job("d", status=JobStatus.failed, error="cannot load"))
    new = batch("n2", job("a", artifact(), artifact(id_="pt2", status=StepStatus.failed)), job("b", artifact()),
                job("c", status=JobStatus.failed, error="[step load] not a model"),
                job("d", status=JobStatus.failed, error="cannot load"))
    rows = {(r.model, r.artifact): r for r in compare(base, new).rows}
    assert rows[("a", "pt2")].verdict is Verdict.regression
    assert "conversion now fails: export failed" in rows[("a", "pt2")].reasons[0]
    assert rows[("a", "onnx")].verdict is Verdict.unchanged
    assert rows[("b", "onnx")].verdict is Verdict.improvement
    assert rows[("c", "onnx")].verdict is Verdict.regression
    assert "the job now fails: [step load] not a model" in rows[("c", "onnx")].reasons
    assert rows[("d", None)].verdict is Verdict.unchanged and "still fails" in rows[("d", None)].reasons[0]


def test_artifacts_requested_or_dropped_are_listed_as_such():
    base = batch("n1", job("a", artifact(), artifact(id_="torchscript")))
    new = batch("n2", job("a", artifact(), artifact(id_="onnx.opset17")))
    rows = {r.artifact: r.verdict for r in compare(base, new).rows}
    assert rows == {"onnx": Verdict.unchanged, "onnx.opset17": Verdict.added, "torchscript": Verdict.removed}


def test_a_moved_source_is_matched_by_name_and_noted():
    base = batch("n1", job("a", artifact(), source="/old/a.pt"))
    new = batch("n2", job("a", artifact(), source="/new/a.pt"))
    c = compare(base, new)
    assert [r.verdict for r in c.rows] == [Verdict.unchanged]
    assert c.notes == ["a (cpu): its source path changed from /old/a.pt to /new/a.pt"]


def test_a_busy_night_is_inconclusive_and_does_not_regress():
    base = batch("n1", job("a", artifact(1.0)))
    new = batch("n2", job("a", artifact(1.5, notes=[BUSY], fastest=1.0)))
    c = compare(base, new)
    assert not c.regressed and c.rows[0].verdict is Verdict.inconclusive


@pytest.mark.parametrize("base, new, message", [
    (batch("n1", job("a", artifact())), batch("n1", job("a", artifact())), "batch n1 is compared with itself"),
    (batch("n1", job("a", artifact())), batch("n2", job("a", artifact()), store="/elsewhere"),
     "the batches come from different stores: n1 from /store, n2 from /elsewhere"),
    (batch("n1", job("a", artifact())), batch("n2", job("b", artifact())),
     "batches n1 and n2 have no model in common (n1: a; n2: b)"),
    (batch("n1", job("a", artifact())), batch("n2", job("a", status=JobStatus.running)),
     "batch n2 is not finished: 1 of 1 job(s) still queued or running (a)"),
])
def test_batches_that_cannot_be_compared(base, new, message):
    with pytest.raises(UsageError) as info:
        compare(base, new)
    assert message in info.value.message


def test_rules_are_configurable():
    base = batch("n1", job("a", artifact(1.0, err=1e-6)))
    new = batch("n2", job("a", artifact(1.3, err=4e-6)))
    assert compare(base, new).regressed  # +30% beyond the default 10%
    strict = compare(base, new, CompareRules(latency_threshold=0.5, error_factor=3))
    assert [r.parity.verdict for r in strict.rows] == [Verdict.regression]  # 4x > 3x
    assert [r.latency.verdict for r in strict.rows] == [Verdict.unchanged]
