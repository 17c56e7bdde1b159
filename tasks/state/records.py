"""Batches live in the store: one state record per job, so `status`, `report` and `--wait` need no broker,
survive client restarts, and read the same in embedded and queued mode. No Celery chord or result backend.
"""

from __future__ import annotations

from collections import Counter

from portq.tasks.core.contract import BatchJob, BatchReport, JobRecord, JobReport, JobStatus, utcnow
from portq.tasks.core.errors import InputError, StoreError
from portq.tasks.state.store import Store, record_key
from pydantic import ValidationError


def write_record(store: Store, record: JobRecord) -> None:
    record.updated_at = utcnow()
    store.write_json(record_key(record.batch, record.job_id), record.model_dump(mode="json"))


def read_record(store: Store, batch: str, job_id: str) -> JobRecord | None:
    key = record_key(batch, job_id)
    if not store.exists(key):
        return None
    return JobRecord.model_validate(store.read_json(key))


def list_records(store: Store, batch: str) -> list[JobRecord]:
    names = [n for n in store.list(f"batches/{batch}/jobs") if n.endswith(".json")]
    records = []
    for name in names:
        try:
            records.append(JobRecord.model_validate(store.read_json(f"batches/{batch}/jobs/{name}")))
        except (StoreError, ValidationError):
            continue  # a record being replaced right now; the next poll reads it
    return sorted(records, key=lambda r: (r.model, r.target.value, r.job_id))


def list_batches(store: Store) -> list[str]:
    return store.list("batches")


def require_batch(store: Store, batch: str) -> list[JobRecord]:
    records = list_records(store, batch)
    if not records:
        known = list_batches(store)
        raise InputError(f"no batch {batch!r} in store {store.root}", step="report",
                         hint=f"known batches: {', '.join(known[-10:]) or '(none)'}")
    return records


def read_report(store: Store, record: JobRecord) -> JobReport | None:
    if not record.result or not store.exists(f"{record.result}/report.json"):
        return None
    return JobReport.model_validate(store.read_json(f"{record.result}/report.json"))


def counts(records: list[JobRecord]) -> dict[str, int]:
    c = Counter(r.status.value for r in records)
    return {s.value: c.get(s.value, 0) for s in JobStatus} | {"total": len(records)}


def batch_report(store: Store, batch: str) -> BatchReport:
    records = require_batch(store, batch)
    jobs = []
    for r in records:
        report = read_report(store, r) if r.status.finished else None
        jobs.append(BatchJob(
            job_id=r.job_id, model=r.model, source=r.source, target=r.target, status=r.status,
            error=r.error, cached=r.cached,
            report=store.url(f"{r.result}/report.json") if report else None,
            artifacts=report.artifacts if report else [], best=report.best if report else None,
        ))
    return BatchReport(batch=batch, store=store.root, counts=counts(records), jobs=jobs)
