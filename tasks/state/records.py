"""Batches live in the store: one state record per job, so `status`, `report` and `--wait` need no broker,
survive client restarts, and read the same in embedded and queued mode. No Celery chord or result backend.

This module reads records and batches. Which status a job has is decided by `portq.tasks.state.lifecycle`
alone, which writes every status change (compare-and-set, with the table of allowed moves).
"""

from __future__ import annotations

from collections import Counter

from portq.tasks.core.contract import (
    BatchJob,
    BatchReport,
    JobRecord,
    JobReport,
    JobSpec,
    JobStatus,
    read_versioned,
    utcnow,
)
from portq.tasks.core.errors import UsageError
from portq.tasks.state import keys
from portq.tasks.state.store import Store
from pydantic import ValidationError


def new_record(spec: JobSpec, status: JobStatus = JobStatus.queued, error: str | None = None) -> JobRecord:
    """A job's first record (not yet written)."""
    return JobRecord(job_id=spec.job_id, batch=spec.batch_id, model=spec.model, source=spec.display,
                     target=spec.target, kind=spec.kind, status=status, error=error)


def write_record(store: Store, record: JobRecord) -> None:
    """Write `record` as it is, unconditionally, keeping its version: for setting up a store (tests, imports).
    A status change goes through `portq.tasks.state.lifecycle`, which checks and versions it."""
    record.updated_at = utcnow()
    store.write_json(keys.record_key(record.batch, record.job_id), record.model_dump(mode="json"))


def read_record(store: Store, batch: str, job_id: str) -> JobRecord | None:
    key = keys.record_key(batch, job_id)
    data = store.read_many([key]).get(key)  # one request: a missing record is None, not an error
    return None if data is None else JobRecord.model_validate(store.parse_json(key, data))


class RecordReader:
    """A batch's records as they change: each `read()` lists the batch's record folder once, with every
    record's version (its ETag on an object store; inode, mtime and size in a directory), and fetches only the
    records that are new or changed since the last read, concurrently. Following a batch of N jobs to its end
    costs one listing per poll plus one read per change, not N reads per poll."""

    def __init__(self, store: Store, batch: str):
        self.store = store
        self.batch = batch
        self._seen: dict[str, tuple[str, JobRecord]] = {}  # record file name -> (version, record)

    def read(self) -> list[JobRecord]:
        folder = keys.records_folder(self.batch)
        versions = {n: v for n, v in self.store.versions(folder).items() if n.endswith(".json")}
        changed = [n for n, v in versions.items() if n not in self._seen or self._seen[n][0] != v]
        fetched = self.store.read_many([f"{folder}/{n}" for n in changed])
        for name in changed:
            data = fetched.get(f"{folder}/{name}")
            try:
                record = JobRecord.model_validate_json(data) if data is not None else None
            except ValidationError:
                record = None  # a record being replaced right now; the next read has it whole
            if record is not None:
                self._seen[name] = (versions[name], record)
        for name in set(self._seen) - set(versions):
            del self._seen[name]
        return sorted((r for _, r in self._seen.values()), key=lambda r: (r.model, r.target.value, r.job_id))


def list_records(store: Store, batch: str) -> list[JobRecord]:
    """Every record of the batch, read once (one listing, then the records concurrently)."""
    return RecordReader(store, batch).read()


def list_batches(store: Store) -> list[str]:
    return store.list(keys.BATCHES)


def require_batch(store: Store, batch: str, step: str = "report") -> list[JobRecord]:
    """The batch's records; an unknown batch is a usage mistake (UsageError: exit 2, as for `compare`)."""
    records = list_records(store, batch)
    if not records:
        known = list_batches(store)
        raise UsageError(f"no batch {batch!r} in store {store.display}", step=step,
                         hint=f"known batches: {', '.join(known[-10:]) or '(none)'}")
    return records


def read_report(store: Store, record: JobRecord) -> JobReport | None:
    """The job's report.json; an OlderVersionError when an older portq wrote it."""
    if not record.result:
        return None
    key = f"{record.result}/report.json"
    data = store.read_many([key]).get(key)
    return None if data is None else read_versioned(JobReport, store.parse_json(key, data), store.url(key))


def counts(records: list[JobRecord]) -> dict[str, int]:
    c = Counter(r.status.value for r in records)
    return {s.value: c.get(s.value, 0) for s in JobStatus} | {"total": len(records)}


def batch_report(store: Store, batch: str, records: list[JobRecord] | None = None) -> BatchReport:
    """The batch's report: each record with its job's report.json (the reports read concurrently).
    `records`: the batch's records when the caller has just read them."""
    records = records or require_batch(store, batch)
    keys = {r.job_id: f"{r.result}/report.json" for r in records if r.status.finished and r.result}
    found = store.read_many(list(keys.values()))
    jobs = []
    for r in records:
        key = keys.get(r.job_id)
        report = read_versioned(JobReport, store.parse_json(key, found[key]), store.url(key)) \
            if key and key in found else None
        jobs.append(BatchJob(
            job_id=r.job_id, kind=r.kind, model=r.model, source=r.source, target=r.target, status=r.status,
            error=r.error, cached=r.cached, result=report.result if report else None,
            report=store.url(key) if report and key else None,
            artifacts=report.artifacts if report else [], best=report.best if report else None,
            best_note=report.best_note if report else None,
        ))
    return BatchReport(batch=batch, store=store.display, counts=counts(records), jobs=jobs)
