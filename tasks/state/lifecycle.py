"""A job's life: the one module that picks a job's status. Callers say what happened (an intent: `submitted`,
`started`, `finished`, `requeued`...); this module decides the status, checks the move against `ALLOWED` and
writes the record:

    (new) -> queued | failed                  submitted; refused at submit or on arrival; not sent
    queued -> queued                          a transient failure noted before a retry
    queued -> running | succeeded | failed | cancelled
                                              started; served from the cache; refused, dead-lettered or
                                              not sent; cancelled
    running -> running | succeeded | failed | cancelled | queued
                                              a new attempt after a lost worker; finished; killed;
                                              requeued for a retry
    succeeded | failed | cancelled -> queued  `portq retry` resets it

Every write is conditional on the version that was read (compare-and-set). A record carries `version`; writing
version n+1 first creates `batches/<batch>/versions/<job_id>/<n+1>.json` with `Store.create` (link(2) on a
directory, `If-None-Match: *` on S3): of two writers that read version n, exactly one creates it, the other
learns it lost. The loser re-reads the record as the winner left it and tries its intent once more against it
(`ALLOWED` checked again); when that move is not allowed, the two writers disagree and it raises
`IllegalTransition` (or, where the intent says so, leaves the winner's record). The version file holds the
record it claims, so a writer that died between the claim and the record's write loses nothing: the next writer
reads the claim. A progress note (`note_step`) that loses a race is dropped, never written over a newer status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from portq.tasks.core.contract import JobRecord, JobReport, JobSpec, JobStatus, utcnow
from portq.tasks.core.errors import PortqError, StoreError, TransientError
from portq.tasks.state import keys
from portq.tasks.state.records import new_record, read_record
from portq.tasks.state.store import Store

_FINISHED = {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}
ALLOWED: dict[JobStatus | None, set[JobStatus]] = {
    None: {JobStatus.queued, JobStatus.failed},
    JobStatus.queued: {JobStatus.queued, JobStatus.running, JobStatus.succeeded, JobStatus.failed,
                       JobStatus.cancelled},
    JobStatus.running: {JobStatus.running, JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled,
                        JobStatus.queued},
    **{s: {JobStatus.queued} for s in _FINISHED},
}
#: how many versions past the one read a writer follows before it gives up (only a claim left unwritten is
#: ever past the record's own version, so one is usual)
_FOLLOW = 8


class IllegalTransition(PortqError):
    """A status change the job's life does not allow (a bug, or two writers disagreeing)."""

    kind = "state"


# ------------------------------------------------------------------------------------------------- intents


def submitted(store: Store, job: JobSpec | JobRecord) -> JobRecord:
    """The client wrote the job's spec: its first record, queued."""
    record = new_record(job) if isinstance(job, JobSpec) else job
    return _move(store, record, JobStatus.queued, fresh=True)


def refused(store: Store, record: JobRecord, reason: str, *, new: bool = False) -> JobRecord:
    """The job must not run (a path that cannot become a job, over a size limit, a message that is not a job):
    failed at once with `reason`, not retried. `new`: the record was built by the caller and never written.
    A job that finished meanwhile stays finished."""
    return _move(store, record, JobStatus.failed, fresh=new, error=reason, result=None, on_conflict=_keep_finished)


def not_sent(store: Store, record: JobRecord, reason: str, dead_letter: str) -> JobRecord:
    """The job never reached the broker: failed with `reason`, its dead letter where `portq retry` sends it."""
    return _move(store, record, JobStatus.failed, error=reason, result=None, dead_letter=dead_letter,
                 on_conflict=_keep_finished)


def dead_lettered(store: Store, spec: JobSpec, record: JobRecord | None, reason: str, dead_letter: str) -> JobRecord:
    """The job ended without a report (its worker died on every attempt, it ran out of time, its transient
    failures outlasted the retries): failed, its dead letter at `dead_letter`."""
    return _move(store, record or new_record(spec), JobStatus.failed, fresh=record is None, result=None,
                 dead_letter=dead_letter, error=reason, on_conflict=_keep_finished)


@dataclass
class Admission:
    """What one delivery of a job does: run it, or skip it (and why, for the log). `record`: the job's record
    as read; None when this store has none (`missing`)."""

    run: bool
    reason: str = ""
    record: JobRecord | None = field(default=None, repr=False)
    missing: bool = False


def admitted(store: Store, spec: JobSpec, max_attempts: int, dead_letter: Any) -> Admission:
    """Decide what this delivery of `spec` does, from the job's record: a finished (or cancelled) job is skipped;
    one whose attempts all died is dead-lettered (`dead_letter(store, spec, record, reason)` writes it); a job
    with no record in this store is not run (`missing`: the caller says why); anything else runs."""
    try:
        record = read_record(store, spec.batch_id, spec.job_id)
    except StoreError as e:
        raise TransientError(e.cause, step="store") from e
    if record is None:
        return Admission(False, f"no record of it in store {store.display}", missing=True)
    if record.status.finished:
        return Admission(False, f"already {record.status.value}", record)
    if record.attempts >= max_attempts:
        # Every attempt so far started and never finished: its worker died under it each time.
        last = record.error or f"the last attempt was on {record.worker or 'an unknown worker'} and never finished"
        dead_letter(store, spec, record, f"its worker died during each of its {record.attempts} attempts ({last})")
        return Admission(False, f"dead-lettered after {record.attempts} attempts", record)
    return Admission(True, record=record)


def started(store: Store, record: JobRecord, worker: str) -> JobRecord:
    """An admitted job starts an attempt on `worker`. A job cancelled (or finished) since it was admitted stays
    so: the caller sees a status other than running and does not run it."""
    return _move(store, record, JobStatus.running, worker=worker, step="load", on_conflict=_keep_finished)


def served_from_cache(store: Store, record: JobRecord, result: str) -> JobRecord:
    """An identical job's result was already in the store: succeeded, pointing at it (unless it was cancelled
    meanwhile)."""
    return _move(store, record, JobStatus.succeeded, result=result, cached=True, on_conflict=_keep_finished)


def finished(store: Store, record: JobRecord, report: JobReport, result: str | None) -> JobRecord:
    """The job ran to its report (published at `result`): its status is the report's. A job cancelled while it
    ran stays cancelled."""
    if not report.status.finished:
        raise IllegalTransition(f"job {record.job_id} finished with status {report.status.value}", step="state")
    return _move(store, record, report.status, result=result, cached=False, error=report.error,
                 on_conflict=_keep_finished)


def requeued(store: Store, record: JobRecord, note: str) -> JobRecord:
    """The job goes back to the queue (its process died, a transient failure will be retried); `note` says why.
    A job that finished meanwhile stays finished."""
    return _move(store, record, JobStatus.queued, error=note, on_conflict=_keep_finished)


def cancelled(store: Store, record: JobRecord, why: str) -> JobRecord:
    """`portq cancel`, or a process killed by `cancel --terminate`."""
    return _move(store, record, JobStatus.cancelled, error=why, on_conflict=_keep_finished)


def gave_up(store: Store, record: JobRecord, reason: str) -> JobRecord:
    """The job cannot go on (storage trouble in the embedded default): failed, unless it finished meanwhile."""
    if record.status.finished:
        return record
    return _move(store, record, JobStatus.failed, error=reason, on_conflict=_keep_finished)


def reset(store: Store, record: JobRecord) -> JobRecord:
    """Back to queued as if new (`portq retry`): attempts, result, worker and dead letter go. A job that another
    writer put back on its way meanwhile (queued or running) is left as it is."""
    return _move(store, record, JobStatus.queued, result=None, cached=False, attempts=0, dead_letter=None, worker=None,
                 on_conflict=_on_its_way)


def note_step(store: Store, record: JobRecord, step: str) -> None:
    """What a running job is doing now (`export:onnx`, `parity:onnx`...), for progress displays; not a status
    change. Best effort: a store hiccup here must not fail the job, and a note that lost a race (the job was
    cancelled meanwhile) is dropped."""
    note = record.model_copy(update={"step": step})
    try:
        if _claim(store, note, record.version):
            _adopt(record, note)
    except StoreError:
        pass


# ------------------------------------------------------------------------------------------ the writes


def _keep_finished(fresh: JobRecord) -> bool:
    """On a lost race: leave a record another writer finished (or cancelled) as it is."""
    return fresh.status.finished


def _on_its_way(fresh: JobRecord) -> bool:
    """On a lost race: leave a record another writer queued or started as it is."""
    return not fresh.status.finished


def _move(store: Store, record: JobRecord, to: JobStatus, *, fresh: bool = False, on_conflict: Any = None,
          **fields: Any) -> JobRecord:
    """Move `record` to `to`, set `fields` (error, result, cached, worker, attempts, dead_letter, step) and write
    it if the stored record is still the version `record` was read at; `record` is updated in place.

    `fresh`: the record was never written. The error and the step are cleared unless given; a move to running
    starts a new attempt. After a lost race the move is tried once against the record the other writer left,
    unless `on_conflict(that record)` says to keep it as it is.
    """
    current = None if fresh else record
    for attempt in range(2):
        status = current.status if current is not None else None
        if to not in ALLOWED[status]:
            race = " (another writer changed it meanwhile)" if attempt else ""
            raise IllegalTransition(f"job {record.job_id} cannot go from {status.value if status else 'new'} to "
                                    f"{to.value}{race}", step="state",
                                    hint="please report this with the batch's records")
        base = current if current is not None else record
        updated = base.model_copy(update={"status": to, "error": fields.get("error"), "step": fields.get("step"),
                                          **{k: v for k, v in fields.items() if k not in ("error", "step")}})
        if to is JobStatus.running:
            updated.attempts = base.attempts + 1
        if _claim(store, updated, base.version if current is not None else 0):
            _adopt(record, updated)
            return record
        current = latest(store, record.batch, record.job_id)
        if current is None:
            break
        if on_conflict is not None and on_conflict(current):
            _adopt(record, current)
            return record
    raise PortqError(f"job {record.job_id}'s record changed under this writer twice (or its version files are "
                     "damaged); not written", step="state", hint="please report this with the batch's records")


def _claim(store: Store, record: JobRecord, read_version: int) -> bool:
    """Write `record` as version `read_version + 1`, only if no other writer did: False when one did."""
    record.version = read_version + 1
    record.updated_at = utcnow()
    data = (json.dumps(record.model_dump(mode="json"), indent=2) + "\n").encode()
    if not store.create(keys.version_key(record.batch, record.job_id, record.version), data):
        return False
    store.write_bytes(keys.record_key(record.batch, record.job_id), data)
    return True


def latest(store: Store, batch: str, job_id: str) -> JobRecord | None:
    """The job's record at its newest version: the record file, or a newer version file a writer claimed and has
    not (yet, or ever) copied to it."""
    record = read_record(store, batch, job_id)
    version = record.version if record is not None else 0
    for _ in range(_FOLLOW):
        key = keys.version_key(batch, job_id, version + 1)
        data = store.read_many([key]).get(key)
        if data is None:
            break
        record = JobRecord.model_validate(store.parse_json(key, data))
        version = record.version
    return record


def _adopt(record: JobRecord, written: JobRecord) -> None:
    for name in JobRecord.model_fields:
        setattr(record, name, getattr(written, name))
