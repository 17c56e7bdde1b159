"""The speedup as a paired comparison: the source and the artifact timed in alternating blocks on the same
machine at the same moment, the speedup taken over the pairs with a bootstrap confidence interval, and the
comparison called inconclusive when the machine lies.

Why: timed one after the other, the two sides see different machines (other jobs start and stop, clocks
drift), and on an oversubscribed machine PyTorch's OpenMP threads stall at every operator for a scheduler
slice, multiplying a small model's time by 100 while onnxruntime's pool is hit far less: a 9x speedup read as
1,000x, and "stable", because a consistently wrong number is stable. The method follows the paired
comparisons of careful benchmark harnesses (hyperfine's and pyperf's compare; Kalibera and Jones, "Rigorous
benchmarking in reasonable time", 2013):

- **Blocks, alternating.** After a warm-up of each side, each side's block runs for at least `block_ms`
  (its run count calibrated once); pairs alternate their order (A B, B A, A B ...) so neither side always
  runs second. A block's value is the median of its runs; a pair's ratio is source block / artifact block.
- **The estimate** is the median of the pairs' ratios (taken on the log scale, so 2x and 0.5x weigh the
  same), with a percentile bootstrap interval over the pairs (`confidence`, `resamples`, a fixed seed so a
  report is reproducible from its numbers).
- **Stopping.** At least `min_pairs` pairs; then it stops once the interval is within `precision` of the
  estimate on both sides, or at `max_pairs`, or at `max_seconds`. The report says which stopped it.
- **Knowing when the machine lies.** At every block it samples the runnable threads of other processes (the
  host's, from `/proc/loadavg`, less this process's own running threads from `/proc/self/task`). When their
  median plus this comparison's compute threads exceeds the host's cores, the machine was oversubscribed.
  (Its CPU time per wall second and involuntary context switches are recorded too, as evidence, but not
  judged: spinning thread pools make them ambiguous.) The caller re-times an oversubscribed comparison with
  one thread on both sides (no OpenMP barrier to stall); one that is still oversubscribed, or whose interval
  reaches beyond `wide`, is **inconclusive**: its numbers are reported, never as a precise speedup.

Pure timing and statistics: no torch, no report models (`portq.tasks.checks.latency` turns this into the
report). Everything here can be driven by scripted clocks and loads (tests/tasks/checks/test_paired.py).
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

#: A block never holds more runs than this, however fast the model.
MAX_BLOCK_RUNS = 10_000
#: settling waits at least this long, and looks again at this interval while the other side's pool still runs
SETTLE_MIN_MS = 1.0
SETTLE_POLL_MS = 0.5


@dataclass(frozen=True)
class PairedOptions:
    """How a paired comparison is run and judged (defaults are what a job uses)."""

    warmup: int = 3
    block_ms: float = 10.0
    min_pairs: int = 6
    max_pairs: int = 24
    max_seconds: float = 20.0
    precision: float = 0.05  # stop once the interval lies within ±5% of the estimate
    wide: float = 0.25  # an interval reaching beyond ±25% of the estimate is inconclusive
    confidence: float = 0.95
    resamples: int = 2000
    settle_ms: float = 0.0  # idle time before each block, for the other side's spinning threads to stop


@dataclass
class Load:
    """What the machine did while the comparison ran."""

    cores: int
    threads: int
    others: float = 0.0  # median of the runnable threads of other processes, sampled during the timing
    cpu_per_wall: float | None = None  # this process's CPU seconds per wall second while timing
    involuntary_switches_per_s: float = 0.0

    @property
    def oversubscribed(self) -> bool:
        return self.others + self.threads > self.cores

    @property
    def reason(self) -> str | None:
        if not self.oversubscribed:
            return None
        return (f"the machine was oversubscribed while timing: {self.others:g} runnable threads of other processes "
                f"and {self.threads} of this one on {self.cores} cores")


@dataclass
class PairedTiming:
    """One paired comparison: the speedup with its interval, each side's runs, and the verdict."""

    speedup: float
    low: float
    high: float
    pairs: int
    threads: int
    stopped_by: str
    load: Load
    source_blocks_ms: list[float] = field(default_factory=list)  # each block's median run
    artifact_blocks_ms: list[float] = field(default_factory=list)
    source_runs_ms: list[float] = field(default_factory=list)  # every timed run
    artifact_runs_ms: list[float] = field(default_factory=list)
    artifact_block_runs: int = 0
    artifact_first_ms: float | None = None
    source_block_runs: int = 0
    source_first_ms: float | None = None
    inconclusive: bool = False
    reason: str | None = None
    retimed_from: PairedTiming | None = None  # the first comparison, when this one re-timed it with one thread


def interval(source_blocks: list[float], artifact_blocks: list[float], *, confidence: float = 0.95,
             resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The median of the pairs' ratios (source / artifact) and its percentile bootstrap interval."""
    s, a = np.asarray(source_blocks, dtype=float), np.asarray(artifact_blocks, dtype=float)
    if len(s) != len(a) or not len(s) or (s <= 0).any() or (a <= 0).any():
        raise ValueError("paired blocks must be as many on each side, and positive")
    logs = np.log(s) - np.log(a)
    estimate = float(np.exp(np.median(logs)))
    if len(logs) == 1:
        return estimate, estimate, estimate
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(logs), size=(resamples, len(logs)))
    medians = np.median(logs[picks], axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(medians, [tail, 1 - tail])
    return estimate, float(np.exp(low)), float(np.exp(high))


def within(estimate: float, low: float, high: float, tolerance: float) -> bool:
    """Whether the interval lies within ±tolerance of the estimate on both sides."""
    return estimate > 0 and low >= estimate * (1 - tolerance) and high <= estimate * (1 + tolerance)


def verdict(estimate: float, low: float, high: float, load: Load, opts: PairedOptions) -> str | None:
    """Why the comparison cannot be trusted as a precise speedup (None: it can)."""
    if load.oversubscribed:
        return load.reason
    if not within(estimate, low, high, opts.wide):
        return (f"the interval ({low:.3g}x to {high:.3g}x) is wider than ±{opts.wide:.0%} of the estimate: "
                "the runs varied too much to tell")
    return None


def own_running(skip: str | None = None) -> int | None:
    """This process's threads that are running or runnable now (their state in /proc/self/task/*/stat), less
    the thread `skip` (a native thread id); None where /proc cannot tell."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    running = 0
    for task in tasks:
        if task == skip:
            continue
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                running += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return running


def other_runnable() -> int | None:
    """Runnable threads of other processes now: the host's (the fourth field of /proc/loadavg) less this
    process's own threads that are running or runnable. None where /proc cannot tell."""
    try:
        with open("/proc/loadavg") as f:
            host = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    own = own_running()
    return None if own is None else max(host - own, 0)


def own_threads_running() -> bool:
    """Whether another thread of this process is running or runnable now (a thread pool still spinning); True
    where /proc cannot tell, so that settling waits its whole time."""
    import threading

    others = own_running(skip=str(threading.get_native_id()))
    return others is None or others > 0


def host_cores() -> int:
    """Cores the host runs threads on (runnable threads beyond them wait)."""
    return os.cpu_count() or 1


class _Meter:
    """CPU time, wall time, involuntary context switches and runnable samples over the timing loop."""

    def __init__(self, runnable: Callable[[], int | None]) -> None:
        self.runnable, self.samples = runnable, []  # type: ignore[var-annotated]
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw

    def sample(self) -> None:
        n = self.runnable()
        if n is not None:
            self.samples.append(n)

    def load(self, cores: int, threads: int, cpu_bound: bool) -> Load:
        wall = max(time.perf_counter() - self.wall, 1e-9)
        switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - self.switches
        return Load(cores=cores, threads=threads, others=float(np.median(self.samples)) if self.samples else 0.0,
                    cpu_per_wall=(time.process_time() - self.cpu) / wall if cpu_bound else None,
                    involuntary_switches_per_s=switches / wall)


def measure_paired(
    source: Callable[[], object],
    artifact: Callable[[], object],
    opts: PairedOptions = PairedOptions(),
    *,
    threads: int = 1,
    cpu_bound: bool = True,
    cores: int | None = None,
    clock: Callable[[], int] = time.perf_counter_ns,
    runnable: Callable[[], int | None] = other_runnable,
    pool_busy: Callable[[], bool] = own_threads_running,
    seed: int = 0,
) -> PairedTiming:
    """Time `source()` and `artifact()` in alternating blocks until the speedup's interval is tight enough.

    `threads`: the compute threads each side runs with (for the oversubscription check); `cpu_bound`: False
    for a device that computes elsewhere (CUDA), where CPU time says nothing about the load.
    """

    def timed(fn: Callable[[], object]) -> float:
        start = clock()
        fn()
        return (clock() - start) / 1e6

    first = timed(artifact)
    source_first = timed(source)
    warm = {"source": [timed(source) for _ in range(max(opts.warmup, 1) - 1)],
            "artifact": [timed(artifact) for _ in range(max(opts.warmup, 1) - 1)]}

    def calibrate(side: str, fn: Callable[[], object]) -> int:
        """Runs a block holds: `block_ms` over the median run of the warm-up after the first and a block's worth of
        calibration runs. (Counting the runs that fit in one block let one slow run, a 17 ms stall of a 1.5 ms
        model, make every block a single run, and each block's value that run's stalls; a lower quantile made
        the blocks twice as long as asked, since runs inside blocks were slower than the fastest quarter.)"""
        start, times = clock(), list(warm[side])
        while (clock() - start) / 1e6 < opts.block_ms and len(times) < MAX_BLOCK_RUNS:
            times.append(timed(fn))
        typical = float(np.median(times))
        return min(max(math.ceil(opts.block_ms / typical), 1) if typical > 0 else MAX_BLOCK_RUNS, MAX_BLOCK_RUNS)

    def settle(fn: Callable[[], object]) -> None:
        """Before a block: let the other side's thread pool go idle (onnxruntime's workers spin after a run, and
        OpenMP's after a parallel region; a spinning pool on the same cores slows the block after it), then one
        untimed call. It waits until none of this process's other threads runs, at least `SETTLE_MIN_MS` and at
        most `settle_ms` (OpenMP's pool was idle after about 3 ms here, onnxruntime's ran on past 20 ms)."""
        if opts.settle_ms > 0:
            deadline = time.perf_counter() + opts.settle_ms / 1000
            time.sleep(min(SETTLE_MIN_MS, opts.settle_ms) / 1000)
            while time.perf_counter() < deadline and pool_busy():
                time.sleep(SETTLE_POLL_MS / 1000)
            fn()

    per_block = {"source": calibrate("source", source), "artifact": calibrate("artifact", artifact)}
    sides = {"source": source, "artifact": artifact}
    blocks: dict[str, list[float]] = {"source": [], "artifact": []}
    runs: dict[str, list[float]] = {"source": [], "artifact": []}
    meter = _Meter(runnable)
    last = "artifact"  # calibrate() ran the artifact last
    start = clock()
    estimate = low = high = 0.0
    stopped_by = ""
    while True:
        order = ("source", "artifact") if len(blocks["source"]) % 2 == 0 else ("artifact", "source")
        for side in order:
            if side != last:  # the pairs run A B B A A B ...: a block after one of the same side needs no settling
                settle(sides[side])
            last = side
            block = [timed(sides[side]) for _ in range(per_block[side])]
            runs[side] += block
            blocks[side].append(float(np.median(block)))
            meter.sample()
        pairs = len(blocks["source"])
        if pairs < opts.min_pairs:
            continue
        estimate, low, high = interval(blocks["source"], blocks["artifact"], confidence=opts.confidence,
                                       resamples=opts.resamples, seed=seed)
        if threads > 1 and meter.load(cores or host_cores(), threads, cpu_bound).oversubscribed:
            stopped_by = f"oversubscription, seen after {pairs} pairs"
            break
        if within(estimate, low, high, opts.precision):
            stopped_by = f"the interval came within ±{opts.precision:.0%} after {pairs} pairs"
            break
        if pairs >= opts.max_pairs:
            stopped_by = f"the pair limit ({opts.max_pairs} pairs)"
            break
        if (clock() - start) / 1e9 >= opts.max_seconds:
            stopped_by = f"the time budget ({opts.max_seconds:g} s, {pairs} pairs)"
            break
    load = meter.load(cores or host_cores(), threads, cpu_bound)
    reason = verdict(estimate, low, high, load, opts)
    return PairedTiming(speedup=estimate, low=low, high=high, pairs=len(blocks["source"]), threads=threads,
                        stopped_by=stopped_by, load=load, source_blocks_ms=blocks["source"],
                        artifact_blocks_ms=blocks["artifact"], source_runs_ms=runs["source"],
                        artifact_runs_ms=runs["artifact"], artifact_block_runs=per_block["artifact"],
                        artifact_first_ms=first, source_block_runs=per_block["source"],
                        source_first_ms=source_first, inconclusive=reason is not None, reason=reason)


def spread(medians: list[float]) -> float:
    """(max - min) / min: how far apart window (or block) medians are (0 when equal, inf when one is zero)."""
    lo, hi = min(medians), max(medians)
    if lo <= 0:
        return 0.0 if hi <= 0 else math.inf
    return (hi - lo) / lo
