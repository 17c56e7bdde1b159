"""Latency: the stopping criterion on a scripted clock, and the statistics against the stdlib."""

import math
import statistics

import numpy as np
import pytest
from portq.tasks.checks.latency import (
    build_report,
    interference_notes,
    latency_histogram,
    measure,
    spread,
    sweep_sizes,
)
from portq.tasks.core.contract import LatencyOptions


class ScriptedRunner:
    """Each run advances a fake clock by the next scripted duration (ms): timing logic without real noise."""

    device = "cpu"

    def __init__(self, durations_ms):
        self.durations = iter(durations_ms)
        self.now_ns = 0
        self.calls = 0

    def clock(self):
        return self.now_ns

    def prepare(self, sample):
        return sample

    def run(self, prepared):
        self.calls += 1
        self.now_ns += int(round(next(self.durations) * 1e6))

    def outputs(self, raw):
        return []


def test_spread_by_hand():
    assert spread([10.0, 11.0, 10.5]) == pytest.approx(0.1)
    assert spread([2.0, 2.0]) == 0.0
    assert spread([0.0, 1.0]) == math.inf


def test_stops_when_the_last_windows_agree_and_reports_only_them():
    # first run 50 ms, 2 more warm-up runs, then windows of 2 runs: medians 20, 10, 10.5, 10.2
    script = [50, 9, 9] + [20, 20] + [10, 10] + [10.5, 10.5] + [10.2, 10.2] + [99] * 10
    r = ScriptedRunner(script)
    stats = measure(r, [], warmup=3, runs=6, windows=3, stability=0.10, max_windows=10, clock=r.clock)
    assert stats.stable and stats.first_run_ms == pytest.approx(50)
    assert stats.window_medians_ms == pytest.approx([20, 10, 10.5, 10.2])
    assert stats.samples_ms == pytest.approx([10, 10, 10.5, 10.5, 10.2, 10.2])  # the first window is left out
    assert stats.spread == pytest.approx(0.05) and stats.timed_runs == 8 and r.calls == 11
    assert stats.p50_ms == pytest.approx(statistics.median(stats.samples_ms))
    assert stats.mean_ms == pytest.approx(statistics.fmean(stats.samples_ms))
    assert stats.std_ms == pytest.approx(statistics.stdev(stats.samples_ms))


def test_unstable_runs_stop_at_max_windows_and_say_so():
    medians = [10, 20] * 10
    script = [5] + [m for m in medians for _ in range(2)]
    r = ScriptedRunner(script)
    stats = measure(r, [], warmup=1, runs=4, windows=2, stability=0.10, max_windows=6, clock=r.clock)
    assert not stats.stable and len(stats.window_medians_ms) == 6
    assert stats.runs == 12 and stats.samples_ms.count(10) == 6  # every window counts when unstable
    assert stats.spread == pytest.approx(1.0)


def test_time_budget_stops_an_unstable_measurement():
    script = [1] + [100, 300] * 50
    r = ScriptedRunner(script)
    stats = measure(r, [], warmup=1, runs=1, windows=2, stability=0.1, max_windows=100, max_seconds=1.0,
                    clock=r.clock)
    assert not stats.stable and 2 <= len(stats.window_medians_ms) < 100
    assert sum(stats.samples_ms) / 1000 <= 1.0 + 0.3  # stops after the window that crossed the budget


def test_window_size_is_calibrated_to_min_window_ms():
    r = ScriptedRunner([1.0] * 200)
    stats = measure(r, [], warmup=1, runs=3, windows=3, min_window_ms=10, clock=r.clock)
    assert stats.window_runs == 10 and stats.stable and stats.runs == 30


def test_percentiles_throughput_and_histogram_against_independent_computations():
    rng = np.random.default_rng(5)
    times = list(rng.gamma(4.0, 0.5, size=37) + 1.0)
    r = ScriptedRunner([1.0] + times)
    stats = measure(r, [], warmup=1, runs=37, windows=37, stability=10.0, max_windows=37, batch_size=8,
                    clock=r.clock)
    assert stats.samples_ms == pytest.approx(times, abs=1e-6)
    cuts = statistics.quantiles(stats.samples_ms, n=100, method="inclusive")
    t = stats.timing()
    assert (t.p50_ms, t.p90_ms, t.p95_ms, t.p99_ms) == pytest.approx((cuts[49], cuts[89], cuts[94], cuts[98]))
    assert t.throughput_per_s == pytest.approx(8 * 1000 / statistics.fmean(stats.samples_ms))
    assert t.min_ms == pytest.approx(min(times), abs=1e-6) and t.max_ms == pytest.approx(max(times), abs=1e-6)
    h = latency_histogram(stats.samples_ms)
    assert sum(h.counts) + h.above == 37 and len(h.edges) == len(h.counts) + 1
    assert h.edges[-1] == pytest.approx(cuts[98]) and h.above == sum(1 for x in stats.samples_ms if x > cuts[98])
    width = (cuts[98] - min(stats.samples_ms)) / 20
    first_bin = sum(1 for x in stats.samples_ms if x < min(stats.samples_ms) + width)
    assert h.counts[0] == first_bin


def test_report_keeps_the_v1_keys_and_the_speedup():
    art = measure(r := ScriptedRunner([1] + [2.0] * 6), [], warmup=1, runs=6, windows=3, clock=r.clock)
    src = measure(s := ScriptedRunner([1] + [5.0] * 6), [], warmup=1, runs=6, windows=3, clock=s.clock)
    rep = build_report(device="cpu", opts=LatencyOptions(), artifact=art, source=src)
    assert rep.p50_ms == pytest.approx(2.0) and rep.source_p50_ms == pytest.approx(5.0)
    assert rep.speedup == pytest.approx(2.5) and rep.stable
    assert rep.artifact.p50_ms == rep.p50_ms and rep.source.p50_ms == rep.source_p50_ms


def test_sweep_sizes():
    assert sweep_sizes(LatencyOptions(), None) == []
    assert sweep_sizes(LatencyOptions(), 4) == [1, 4, 8]
    assert sweep_sizes(LatencyOptions(batch_sizes=[16, 2, 2]), 4) == [2, 16]
    assert sweep_sizes(LatencyOptions(sweep=False), 4) == []


def test_windows_that_come_out_too_short_are_discarded_and_grow():
    # calibration sees slow warm-up runs (5 ms): 2 runs fill 10 ms; then the model runs at 0.5 ms
    r = ScriptedRunner([5.0] * 3 + [0.5] * 500)
    stats = measure(r, [], warmup=1, runs=2, windows=2, min_window_ms=10, clock=r.clock)
    assert stats.window_runs >= 20 and stats.stable
    assert stats.samples_ms == pytest.approx([0.5] * len(stats.samples_ms))


def test_interference_is_called_out():
    calm = measure(r := ScriptedRunner([1] + [2.0] * 6), [], warmup=1, runs=6, windows=3, clock=r.clock)
    disturbed = measure(r := ScriptedRunner([1] + [0.05] + [40.0] * 5), [], warmup=1, runs=6, windows=3,
                        stability=1000, clock=r.clock)
    env = {"cpu": {"logical_cores": 2, "affinity": 2}, "load_average_1m": 2.5}
    notes = interference_notes({"artifact": calm, "source": disturbed}, env)
    assert len(notes) == 2 and "load average 2.5 on 2 CPUs" in notes[0] and notes[1].startswith("source: ")
    assert "800x the fastest" in notes[1]
    assert interference_notes({"artifact": calm}, {"cpu": {"logical_cores": 2}, "load_average_1m": 0.5}) == []
