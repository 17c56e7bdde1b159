"""A job's state in its batch: `JobStatus` and the `JobRecord` the client and the worker update."""

from __future__ import annotations

from enum import Enum

from portq.tasks.core.contract.base import ReportModel
from portq.tasks.core.contract.ids import JobKind, Target, utcnow
from pydantic import Field


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)



class JobRecord(ReportModel):
    """A job's state in its batch, updated by the client (queued) and the worker (running, finished)."""

    job_id: str
    batch: str
    model: str
    source: str
    target: Target
    status: JobStatus
    kind: JobKind = JobKind.convert
    error: str | None = None
    result: str | None = Field(None, description="store key of the job's result folder")
    cached: bool = False
    attempts: int = 0
    worker: str | None = Field(None, description="the worker that ran (or runs) the latest attempt")
    dead_letter: str | None = Field(None, description="store key of the job's dead-letter record: it ended "
                                                      "without a report, and `portq retry` can resubmit it")
    step: str | None = Field(None, description="what a running job is doing now: load, source (running the source "
                                               "model), export:ID, parity:ID, latency:ID, localise:ID")
    updated_at: str = Field(default_factory=utcnow)
    version: int = Field(0, description="how many times the record was written: each write is conditional on the "
                                        "version read (portq.tasks.state.lifecycle)")
