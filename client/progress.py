"""Following a batch: each poll of its records in the store as one `BatchProgress`, for whatever displays it.

The records say which jobs are queued, running (and the step each runs now: `export:onnx`, `parity:onnx`...)
or finished. The same watcher follows a batch on the queue (`portq wait`, `--wait`, `portq.wait`) and an
embedded batch running in this process, so both show the same thing. No Rich or Typer here: the API's
callers pass their own display (the CLI's is `portq.client.render.ProgressView`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from portq.tasks.core.contract import JobRecord, JobStatus
from portq.tasks.state import records as batches
from portq.tasks.state.store import Store


@dataclass(frozen=True)
class BatchProgress:
    """A batch at one poll: every record, and those that finished since the previous poll."""

    batch: str
    records: list[JobRecord]
    finished_now: list[JobRecord] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def total(self) -> int:
        return len(self.records)

    @property
    def done(self) -> int:
        return sum(r.status.finished for r in self.records)

    @property
    def failed(self) -> int:
        return sum(r.status is JobStatus.failed for r in self.records)

    @property
    def running(self) -> list[JobRecord]:
        return [r for r in self.records if r.status is JobStatus.running]

    @property
    def complete(self) -> bool:
        return bool(self.records) and self.done == self.total

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace so far; None until a job has run to its end (there is no pace before that).
        Jobs that finished without running (refused at submit, served from the cache) do not set the pace."""
        ran = sum(r.status.finished and r.attempts > 0 for r in self.records)
        if not ran or self.complete:
            return None
        return self.elapsed_s / ran * (self.total - self.done)


#: what a progress display is handed at every poll
OnProgress = Callable[[BatchProgress], None]


class BatchWatcher:
    """Polls a batch's records; each `poll()` says what changed since the last."""

    def __init__(self, store: Store, batch: str) -> None:
        self.store, self.batch = store, batch
        self.start = time.monotonic()
        self._seen_finished: set[str] = set()
        self._reader = batches.RecordReader(store, batch)  # each poll fetches only the records that changed

    def poll(self) -> BatchProgress:
        records = self._reader.read()
        finished = [r for r in records if r.status.finished and r.job_id not in self._seen_finished]
        self._seen_finished.update(r.job_id for r in finished)
        return BatchProgress(self.batch, records, finished, time.monotonic() - self.start)
