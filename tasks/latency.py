"""Latency: warm up, then time repeated runs of the prepared call (inputs already on the device).

The source model and each artifact are timed the same way on the same device, so speedups compare like
with like. Only `runner.run` is timed; input conversion and output copies are not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from portq.tasks.runners import Runner


@dataclass
class LatencyStats:
    warmup: int
    runs: int
    samples_ms: list[float]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.samples_ms))

    @property
    def p50_ms(self) -> float:
        return self.percentile(50)


def measure(runner: Runner, sample: list[np.ndarray], *, warmup: int, runs: int) -> LatencyStats:
    prepared: Any = runner.prepare(sample)
    for _ in range(warmup):
        runner.run(prepared)
    times: list[float] = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        runner.run(prepared)
        times.append((time.perf_counter_ns() - start) / 1e6)
    return LatencyStats(warmup=warmup, runs=runs, samples_ms=times)
