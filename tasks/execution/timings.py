"""Where a job's time goes: seconds per stage, recorded in every job report (`timings`) and on every artifact.

A job's stages: `load` (building the source), `inputs`, `source` (the source's parity runs and latency),
`artifacts` (every artifact step, in the parent's clock: a child process's start included), `reports`
(rendering), `publish` (into the store). An artifact's: `export` (or `optimize`), `script`, `session`,
`parity`, `latency`, `localise`, and `step`: the whole step as the job saw it, so `step` minus the others is
what isolation cost (the child's start and the source's rebuild in it, shown as `isolation`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """Seconds per named stage; a stage timed twice adds up."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = round(self.stages.get(name, 0.0) + seconds, 4)
