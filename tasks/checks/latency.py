"""Latency: warm up, then time windows of runs until the measurement is stable, or say that it is not.

The criterion (`LatencyOptions`): after `warmup` untimed runs (the first one's time is kept as
`first_run_ms`), runs are timed in windows of equal size: `runs / windows` runs, or more so that a window
lasts at least `min_window_ms` (counted in one more untimed calibration window; a window that still
comes out under half that long is discarded as warm-up, and the windows grow). The measurement is **stable** once the
medians of the last `windows` windows lie within `stability` of each other ((max - min) / min <= 0.10 by
default) and at least `runs` runs were timed; the statistics are then taken over those last windows. A
measurement that is still unstable after `max_windows` windows or `max_seconds` stops, is reported with
`stable: false`, and its statistics are taken over every timed run.

The source model and each artifact are timed the same way on the same device, so speedups compare like
with like. Only `runner.run` is timed (it synchronises the device); input conversion and output copies are
not. Everything returned here is plain data (floats and lists), so it can cross a process boundary.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from portq.tasks.checks import heap
from portq.tasks.checks.paired import PairedOptions, PairedTiming, measure_paired, spread
from portq.tasks.checks.runners import Runner
from portq.tasks.core.contract import (
    BUSY_NOTE,
    DISTURBED_NOTE,
    PAIRED_METHOD,
    Histogram,
    LatencyOptions,
    LatencyReport,
    Memory,
    PairedComparison,
    SweepPoint,
    Timing,
    json_float,
)
from portq.tasks.core.errors import first_line

HISTOGRAM_BINS = 20
#: One window never holds more runs than this, however fast the model.
MAX_WINDOW_RUNS = 100_000


@dataclass
class LatencyStats:
    """One measurement: the timed runs its statistics are over, and how it got there."""

    warmup: int
    runs: int
    samples_ms: list[float]
    window_medians_ms: list[float] = field(default_factory=list)
    window_runs: int = 0
    stable: bool = True
    spread: float = 0.0
    batch_size: int | None = None
    first_run_ms: float | None = None
    timed_runs: int = 0  # every timed run, including windows left out of the statistics

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.samples_ms))

    @property
    def p50_ms(self) -> float:
        return self.percentile(50)

    @property
    def std_ms(self) -> float:
        # sample standard deviation (n - 1): the runs are a sample of the model's latency distribution
        return float(np.std(self.samples_ms, ddof=1)) if len(self.samples_ms) > 1 else 0.0

    @property
    def throughput_per_s(self) -> float:
        """Items per second at the mean latency: batch rows when the batch size is known, else calls."""
        mean = self.mean_ms
        return (self.batch_size or 1) * 1000.0 / mean if mean > 0 else 0.0

    def timing(self) -> Timing:
        return Timing(
            batch_size=self.batch_size, warmup=self.warmup, runs=len(self.samples_ms),
            windows=len(self.window_medians_ms), window_runs=self.window_runs,
            window_medians_ms=list(self.window_medians_ms), stable=self.stable, spread=json_float(self.spread),
            mean_ms=self.mean_ms, std_ms=self.std_ms, min_ms=float(min(self.samples_ms)), p50_ms=self.p50_ms,
            p90_ms=self.percentile(90), p95_ms=self.percentile(95), p99_ms=self.percentile(99),
            max_ms=float(max(self.samples_ms)), throughput_per_s=self.throughput_per_s,
            first_run_ms=self.first_run_ms, histogram=latency_histogram(self.samples_ms),
        )


def criterion(opts: LatencyOptions) -> str:
    return (f"stable when the medians of the last {opts.windows} windows are within {opts.stability:.0%} "
            f"of each other ((max - min) / min), after at least {opts.runs} timed runs; "
            f"unstable after {opts.max_windows} windows or {opts.max_seconds:g} s")


def latency_histogram(samples_ms: list[float], bins: int = HISTOGRAM_BINS) -> Histogram:
    """Linear bins from the fastest run to the p99; slower runs are counted in `above`."""
    lo, hi = min(samples_ms), float(np.percentile(samples_ms, 99))
    if hi <= lo:
        hi = max(samples_ms)
    if hi <= lo:
        return Histogram(scale="linear", edges=[lo, lo], counts=[len(samples_ms)])
    inside = [t for t in samples_ms if t <= hi]
    counts, edges = np.histogram(inside, bins=bins, range=(lo, hi))
    return Histogram(scale="linear", edges=[float(e) for e in edges], counts=[int(c) for c in counts],
                     above=len(samples_ms) - len(inside))


def measure(
    runner: Runner,
    sample: list[np.ndarray],
    *,
    warmup: int = 5,
    runs: int = 30,
    windows: int = 3,
    stability: float = 0.10,
    max_windows: int = 12,
    min_window_ms: float = 0.0,
    max_seconds: float = 30.0,
    batch_size: int | None = None,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> LatencyStats:
    """Time `runner.run` on one prepared sample: warm-up, then windows until stable (see the module doc)."""
    prepared: Any = runner.prepare(sample)

    def timed() -> float:
        start = clock()
        runner.run(prepared)
        return (clock() - start) / 1e6

    first = timed()
    for _ in range(max(warmup, 1) - 1):
        timed()
    per_window = max(1, math.ceil(runs / windows))
    if min_window_ms > 0:
        # calibrate (more warm-up): how many runs fill a window of min_window_ms
        calibration, count = clock(), 0
        while (clock() - calibration) / 1e6 < min_window_ms and count < MAX_WINDOW_RUNS:
            timed()
            count += 1
        per_window = max(per_window, count)
    per_window = min(per_window, MAX_WINDOW_RUNS)

    done: list[list[float]] = []
    medians: list[float] = []
    stable = False
    start = clock()
    while True:
        window_start = clock()
        window = [timed() for _ in range(per_window)]
        elapsed_ms = (clock() - window_start) / 1e6
        if (min_window_ms > 0 and 0 < elapsed_ms < min_window_ms / 2 and per_window < MAX_WINDOW_RUNS
                and (clock() - start) / 1e9 < max_seconds / 2):
            # the calibration ran while the model was still warming up: grow the windows and start over
            per_window = min(math.ceil(per_window * min_window_ms / elapsed_ms), MAX_WINDOW_RUNS)
            done, medians = [], []
            continue
        done.append(window)
        medians.append(float(np.median(window)))
        total = sum(len(w) for w in done)
        if len(medians) >= windows and total >= runs and spread(medians[-windows:]) <= stability:
            stable = True
            break
        if len(medians) >= max_windows or (clock() - start) / 1e9 > max_seconds:
            break
    kept = done[-windows:] if stable else done
    samples = [t for w in kept for t in w]
    last_spread = spread(medians[-windows:]) if len(medians) >= 2 else math.inf
    return LatencyStats(
        warmup=max(warmup, 1), runs=len(samples), samples_ms=samples, window_medians_ms=medians,
        window_runs=per_window, stable=stable, spread=last_spread, batch_size=batch_size, first_run_ms=first,
        timed_runs=sum(len(w) for w in done),
    )


def measure_with(
    runner: Runner, sample: list[np.ndarray], opts: LatencyOptions, *, batch_size: int | None = None,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> LatencyStats:
    """`measure` with a job's latency options."""
    return measure(runner, sample, warmup=opts.warmup, runs=opts.runs, windows=opts.windows,
                   stability=opts.stability, max_windows=opts.max_windows, min_window_ms=opts.min_window_ms,
                   max_seconds=opts.max_seconds, batch_size=batch_size, clock=clock)


def speedup(source: LatencyStats, artifact: LatencyStats) -> float:
    """Source p50 over artifact p50 (above 1: the artifact is faster)."""
    return source.p50_ms / artifact.p50_ms if artifact.p50_ms > 0 else 0.0


def build_report(
    *,
    device: str,
    opts: LatencyOptions,
    artifact: LatencyStats,
    source: LatencyStats,
    sweep: list[tuple[int, LatencyStats, LatencyStats]] | None = None,
    load_ms: float | None = None,
    memory: Memory | None = None,
    source_memory: Memory | None = None,
    providers: list[str] | None = None,
    notes: list[str] | None = None,
) -> LatencyReport:
    """The artifact's latency report, with the source's numbers beside it (keys of schema v1 kept flat)."""
    return LatencyReport(
        device=device, warmup=artifact.warmup, runs=artifact.runs,
        p50_ms=artifact.p50_ms, p90_ms=artifact.percentile(90), p99_ms=artifact.percentile(99),
        mean_ms=artifact.mean_ms, source_p50_ms=source.p50_ms, source_p90_ms=source.percentile(90),
        source_p99_ms=source.percentile(99), source_mean_ms=source.mean_ms, speedup=speedup(source, artifact),
        stable=artifact.stable and source.stable, criterion=criterion(opts),
        artifact=artifact.timing(), source=source.timing(),
        sweep=[SweepPoint(batch_size=b, artifact=a.timing(), source=s.timing(), speedup=speedup(s, a))
               for b, a, s in (sweep or [])],
        load_ms=load_ms, memory=memory, source_memory=source_memory, providers=providers, notes=notes or [],
    )


#: A median this many times the fastest run says the runs were disturbed (preemption, throttling, other jobs).
DISTURBED_RATIO = 5.0


def interference_notes(measurements: dict[str, LatencyStats], environment: dict[str, Any]) -> list[str]:
    """Warnings a reader needs before trusting the numbers: a busy machine, or runs far slower than the fastest."""
    notes = []
    cpus = (environment.get("cpu") or {}).get("affinity") or (environment.get("cpu") or {}).get("logical_cores")
    load = environment.get("load_average_1m")
    if load is not None and cpus and load > cpus:
        notes.append(f"{BUSY_NOTE} when the source was timed (load average {load:g} on {cpus} CPUs): "
                     "latencies may be inflated and speedups distorted")
    for name, stats in measurements.items():
        fastest = min(stats.samples_ms)
        if fastest > 0 and stats.p50_ms > DISTURBED_RATIO * fastest:
            notes.append(f"{name}: the median run ({stats.p50_ms:.3g} ms) is {stats.p50_ms / fastest:.0f}x the "
                         f"fastest ({fastest:.3g} ms): {DISTURBED_NOTE} (other load, throttling, thread "
                         "oversubscription)")
    return notes


def sweep_sizes(opts: LatencyOptions, sample_batch: int | None) -> list[int]:
    """Batch sizes to time when the batch dim is dynamic: the job's list, else 1, the sample's and 8."""
    if sample_batch is None or not opts.sweep:
        return []
    sizes = opts.batch_sizes or sorted({1, sample_batch, 8})
    return sorted(set(sizes))



# ------------------------------------------------------------------------------------ the job's two halves


@heap.steady()
def time_source(
    runner: Runner, sig: Any, samples: list[list[np.ndarray]], opts: LatencyOptions, *, seed: int
) -> tuple[int | None, dict[int, tuple[list[np.ndarray], LatencyStats | None]]]:
    """Time the source at each sweep batch size but the sample's, when the `batch` dim is dynamic.

    The source is not timed on its own on the sample: each artifact's paired comparison times it there, beside
    the artifact (`time_artifact`), and reports those numbers as the source's; timed here as well it cost a job as
    much again and its numbers were another moment's. Returns (the sample's batch size or None, {batch size:
    (inputs, measurement)}), where the sample's own batch size maps to (samples[0], None): the comparison's.
    The sweep inputs are drawn from their own seeded stream, so the parity draws stay as they were. The C heap
    is held steady meanwhile (`portq.tasks.checks.heap`).
    """
    from portq.tasks.sources.inputs import random_sample

    axes = [(i, axis) for i, s in enumerate(sig.specs) for axis, name in s.dynamic.items() if name == "batch"]
    batch = int(samples[0][axes[0][0]].shape[axes[0][1]]) if axes else None
    sweep: dict[int, tuple[list[np.ndarray], LatencyStats | None]] = {}
    rng = np.random.default_rng(seed + 7919)
    for size in sweep_sizes(opts, batch):
        if size == batch:
            sweep[size] = (samples[0], None)
            continue
        inputs = random_sample(sig, rng, {"batch": size})
        try:
            stats = measure_with(runner, inputs, opts, batch_size=size)
        except Exception:  # a model that only takes its example batch size: no sweep point, not a failure
            continue
        sweep[size] = (inputs, stats)
    return batch, sweep


@heap.steady()
def time_artifact(runner: Runner, ev: Any, opts: LatencyOptions, *, probe: Any, load_ms: float, source: Runner,
                  host_copies: bool = False, reopen: Callable[[], Runner] | None = None,
                  seed: int = 0) -> LatencyReport:
    """Time an artifact against the source (`ev`: the job's SourceEvidence; `source`: the source model's runner)
    and report both.

    The headline speedup is a paired comparison (`compare_paired`): source and artifact in alternating blocks,
    with an interval and a verdict; each side's own numbers are its blocks'. At the sweep's other batch sizes each
    is timed on its own. `reopen` opens the artifact again, for a comparison re-timed with one thread. The C heap
    is held steady meanwhile (`portq.tasks.checks.heap`), as it was when the source was timed."""
    paired = compare_paired(source, runner, ev.samples[0], opts, device=ev.device, reopen=reopen, seed=seed)
    stats = paired_stats(paired, opts, batch_size=ev.batch_size)
    source_stats = paired_stats(paired, opts, batch_size=ev.batch_size, side="source")
    probe.warm()
    sweep, notes = [], []
    for size, (inputs, source_point) in sorted(ev.sweep.items()):
        try:
            point = stats if size == ev.batch_size else measure_with(runner, inputs, opts, batch_size=size)
        except Exception as e:  # an artifact specialised to one batch size: say so, keep the rest
            notes.append(f"batch size {size}: {type(e).__name__}: {first_line(e)}")
            continue
        sweep.append((size, point, source_point if source_point is not None else source_stats))
    if host_copies and ev.device.startswith("cuda"):
        notes.append("onnxruntime timings include copying inputs to and outputs from the GPU (no I/O binding); "
                     "the source's inputs are already on the GPU")
    report = build_report(device=ev.device, opts=opts, artifact=stats, source=source_stats, sweep=sweep,
                          load_ms=load_ms, memory=probe.stop(), source_memory=ev.memory,
                          providers=getattr(runner, "providers", None), notes=notes)
    apply_paired(report, paired)
    return report


def paired_options(opts: LatencyOptions) -> PairedOptions:
    """A job's latency options as the paired comparison reads them: a block is a quarter of a window (so the
    minimum of 6 pairs costs what the windows' minimum did), the interval must come within the windows'
    stability of the estimate (±10% by default), and a third of the measurement budget bounds it (10 s by
    default: it may run twice, at the job's threads and at one), at most `MAX_PAIRS` pairs. What it costs against
    the windows it replaced is measured by `benchmarks/paired_cost.py` (docs/benchmarks.md): the settling between
    blocks, which makes the number right, is most of the difference."""
    return PairedOptions(warmup=max(opts.warmup, 1), block_ms=max(opts.min_window_ms / 4, 1.0),
                         max_pairs=MAX_PAIRS, max_seconds=opts.max_seconds / 3, precision=opts.stability,
                         settle_ms=SETTLE_MS)


#: a job's comparison stops here if its interval has not come within the precision by then: past 12 pairs the
#: quick start's comparisons that had not (a tiny CNN on a noisy host) ran on to 24 without coming within it,
#: tripling their cost; the verdict (`wide`: ±25%) says what such an interval is worth
MAX_PAIRS = 12


#: the longest idle wait before a block that follows the other side's, on a CPU: onnxruntime's workers spin after a run
#: and OpenMP's after a parallel region, and a pool spinning on the same cores slowed the next block up to 2x (a CNN's
#: TorchScript source at 37-47 ms after an onnxruntime block against 16-24 ms alone: 3.3x reported for a true 1.5x).
#: Waiting until the process's other threads are idle (at most this long; OpenMP's were after about 3 ms,
#: onnxruntime's ran past 20 ms) and one untimed call brought the paired ratio within 10% of the two timed alone.
SETTLE_MS = 10.0


@heap.steady()
def compare_paired(source: Runner, artifact: Runner, sample: list[np.ndarray], opts: LatencyOptions, *,
                   device: str, reopen: Callable[[], Runner] | None = None, seed: int = 0) -> PairedTiming:
    """The paired comparison of the source and an artifact on one sample; on an oversubscribed CPU, once more
    with one thread on both sides (torch's pool, and the artifact opened again by `reopen`). The C heap is held
    steady meanwhile (`portq.tasks.checks.heap`)."""
    import torch
    from portq.tasks.checks import runtimes

    cpu = not device.startswith("cuda")
    popts = paired_options(opts) if cpu else dataclasses.replace(paired_options(opts), settle_ms=0.0)
    threads = torch.get_num_threads() if cpu else 1

    def once(art: Runner, n: int) -> PairedTiming:
        src_in, art_in = source.prepare(sample), art.prepare(sample)
        return measure_paired(lambda: source.run(src_in), lambda: art.run(art_in), popts, threads=n,
                              cpu_bound=cpu, seed=seed)

    first = once(artifact, threads)
    if not (cpu and threads > 1 and first.load.oversubscribed):
        return first
    saved = runtimes.JOB_THREADS
    torch.set_num_threads(1)
    runtimes.JOB_THREADS = 1
    try:
        single = once(reopen() if reopen is not None else artifact, 1)
    finally:
        torch.set_num_threads(threads)
        runtimes.JOB_THREADS = saved
    single.retimed_from = first
    return single


def paired_stats(paired: PairedTiming, opts: LatencyOptions, *, batch_size: int | None,
                 side: str = "artifact") -> LatencyStats:
    """One side's own numbers from the comparison's blocks of that side (its timing section and p50): the
    artifact's, or the source's (`side="source"`), timed beside it."""
    source = side == "source"
    blocks = paired.source_blocks_ms if source else paired.artifact_blocks_ms
    runs = paired.source_runs_ms if source else paired.artifact_runs_ms
    last = blocks[-opts.windows:]
    spread_ = spread(last) if len(last) >= 2 else math.inf
    return LatencyStats(warmup=max(opts.warmup, 1), runs=len(runs), samples_ms=runs, window_medians_ms=blocks,
                        window_runs=paired.source_block_runs if source else paired.artifact_block_runs,
                        stable=spread_ <= opts.stability, spread=spread_, batch_size=batch_size,
                        first_run_ms=paired.source_first_ms if source else paired.artifact_first_ms,
                        timed_runs=len(runs))


def apply_paired(report: LatencyReport, paired: PairedTiming) -> None:
    """The comparison's speedup, interval and verdict into the artifact's latency report."""
    load = paired.load
    report.speedup = paired.speedup
    report.speedup_interval = [paired.low, paired.high]
    report.inconclusive = paired.inconclusive
    report.inconclusive_reason = paired.reason
    report.stable = report.stable and not paired.inconclusive
    report.comparison = PairedComparison(
        method=PAIRED_METHOD, pairs=paired.pairs, threads=paired.threads, stopped_by=paired.stopped_by,
        confidence=PairedOptions.confidence, cores=load.cores, other_runnable_threads=load.others,
        cpu_per_wall=load.cpu_per_wall, involuntary_switches_per_s=load.involuntary_switches_per_s,
        source_blocks_ms=paired.source_blocks_ms, artifact_blocks_ms=paired.artifact_blocks_ms)
    first = paired.retimed_from
    if first is not None:
        report.notes.append(f"timed with one thread on both sides: at {first.threads} threads "
                            f"{first.reason} (the {first.threads}-thread reading was {first.speedup:.3g}x, "
                            f"{first.low:.3g}x to {first.high:.3g}x)")
