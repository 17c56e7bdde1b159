"""What a job's message does when it arrives, possibly not for the first time; lost workers; dead letters.

With late acknowledgement a job's message can be delivered more than once: Celery requeues it at once
when the process running it died, Redis restores it after the visibility timeout when the whole worker
died, and a broker hiccup can do either. The job's state record in the store decides what a delivery
does (`admit`): a finished (or cancelled) job is skipped, a job whose attempts keep dying is moved to
the dead letters instead of being tried forever, anything else runs.

A dead letter (`batches/<batch>/dead/<job_id>.json`) keeps the job's spec and why it ended without a
report: its process died on every attempt, it ran out of time, or its transient failures outlasted the
retries. `portq retry BATCH` resubmits dead letters. Nothing here imports Celery or torch: the
worker's main process calls it.
"""

from __future__ import annotations

import re
from typing import Any

from portq.tasks.core.contract import SAFE_ID, JobRecord, JobSpec, JobStatus, Target, read_versioned, safe_name, utcnow
from portq.tasks.core.errors import InputError
from portq.tasks.state import lifecycle, records
from portq.tasks.state.keys import dead_folder, dead_letter_key, spec_key
from portq.tasks.state.lifecycle import Admission  # noqa: F401  (its old home)
from portq.tasks.state.store import Store

RETRY_HINT = "`portq retry {batch}` resubmits it"


def admit(store: Store, spec: JobSpec, max_attempts: int) -> Admission:
    """Decide what this delivery of `spec` does, from the job's state record (`lifecycle.admitted`): the one
    place that decides, for the queue's deliveries and the embedded default's runs alike."""
    return lifecycle.admitted(store, spec, max_attempts, dead_letter)


def worker_lost(store: Store, raw_spec: Any, cause: str, max_attempts: int) -> JobRecord | None:
    """In the worker's main process: the process running this job died (`cause` says how).

    The message is requeued by Celery; the record says so, or, once the attempts are used up, the job
    is dead-lettered (the requeued delivery then finds it finished and skips it).
    """
    spec = _spec_or_none(raw_spec)
    if spec is None:
        return None
    record = records.read_record(store, spec.batch_id, spec.job_id)
    if record is None or record.status.finished:
        return record
    cause = describe_loss(cause)
    if record.attempts >= max_attempts:
        return dead_letter(store, spec, record, f"the worker process died on each of its {record.attempts} "
                                                f"attempts; the last time: {cause}")
    return lifecycle.requeued(store, record, f"attempt {record.attempts} of {max_attempts} ended when {cause}; "
                                             "requeued")


def time_limit_exceeded(store: Store, raw_spec: Any, limit_s: float) -> JobRecord | None:
    """In the worker's main process: the job ran past PORTQ_TASK_TIME_LIMIT and its process was killed."""
    spec = _spec_or_none(raw_spec)
    if spec is None:
        return None
    record = records.read_record(store, spec.batch_id, spec.job_id)
    if record is not None and record.status.finished:
        return record
    return dead_letter(store, spec, record, f"exceeded the job time limit of {limit_s:g}s (PORTQ_TASK_TIME_LIMIT) "
                                            "and its process was killed")


def terminated(store: Store, raw_spec: Any) -> JobRecord | None:
    """In the worker's main process: `portq cancel --terminate` killed the job's process."""
    spec = _spec_or_none(raw_spec)
    record = records.read_record(store, spec.batch_id, spec.job_id) if spec else None
    if record is None or record.status.finished:  # already recorded (cancel --terminate marks it itself)
        return record
    return lifecycle.cancelled(store, record, "cancelled while running: its process was killed")


def dead_letter(store: Store, spec: JobSpec, record: JobRecord | None, reason: str) -> JobRecord:
    """Record the job failed with `reason`, keeping its spec where `portq retry` finds it."""
    key = _write_dead_letter(store, spec, record, reason)
    return lifecycle.dead_lettered(store, spec, record, f"{reason} (dead-lettered: "
                                                        f"{RETRY_HINT.format(batch=spec.batch_id)})", key)


def not_sent(store: Store, spec: JobSpec, reason: str) -> JobRecord:
    """The job never reached the broker: failed with `reason` and dead-lettered, so `status`, `wait` and `report`
    do not show it queued forever and `portq retry BATCH` sends it once the broker is back."""
    record = records.read_record(store, spec.batch_id, spec.job_id)
    key = _write_dead_letter(store, spec, record, reason)
    error = f"not sent: {reason} ({RETRY_HINT.format(batch=spec.batch_id).replace('resubmits', 'sends')})"
    if record is None:
        return lifecycle.dead_lettered(store, spec, None, error, key)
    return lifecycle.not_sent(store, record, error, key)


def _write_dead_letter(store: Store, spec: JobSpec, record: JobRecord | None, reason: str) -> str:
    key = dead_letter_key(spec.batch_id, spec.job_id)
    store.write_json(key, {"job_id": spec.job_id, "batch": spec.batch_id, "model": spec.model, "reason": reason,
                           "attempts": record.attempts if record else 0, "worker": record.worker if record else None,
                           "at": utcnow(), "spec": spec.model_dump(mode="json")})
    return key


def refuse(store: Store, spec: JobSpec, reason: str) -> JobRecord:
    """A job that must not run here (over a size limit): failed at once, not retried."""
    record = records.read_record(store, spec.batch_id, spec.job_id)
    return lifecycle.refused(store, record or records.new_record(spec), reason, new=record is None)


def reject_message(store: Store, raw: Any, problem: str) -> JobRecord | None:
    """A message that is not a valid job: if it names a usable batch and job id, record why it was refused."""
    if not isinstance(raw, dict):
        return None
    batch, job_id = raw.get("batch_id"), raw.get("job_id")
    if not (isinstance(batch, str) and isinstance(job_id, str) and SAFE_ID.match(batch) and SAFE_ID.match(job_id)):
        return None
    model = raw.get("model")
    record = JobRecord(job_id=job_id, batch=batch, model=safe_name(model if isinstance(model, str) else "model"),
                       source="?", target=Target.cpu, status=JobStatus.failed)
    return lifecycle.refused(store, record, InputError(f"the worker refused this job's message: {problem}",
                                                      step="receive").message, new=True)


def write_spec(store: Store, spec: JobSpec) -> None:
    store.write_json(spec_key(spec.batch_id, spec.job_id), spec.model_dump(mode="json"))


def read_spec(store: Store, batch: str, job_id: str) -> JobSpec | None:
    """The job's spec as submitted (or as its dead letter kept it); OlderVersionError for an older portq's."""
    for key, pick in ((spec_key(batch, job_id), lambda d: d), (dead_letter_key(batch, job_id), lambda d: d["spec"])):
        if store.exists(key):
            return read_versioned(JobSpec, pick(store.read_json(key)), store.url(key))
    return None


def dead_letters(store: Store, batch: str) -> list[dict[str, Any]]:
    return [store.read_json(f"{dead_folder(batch)}/{name}") for name in store.list(dead_folder(batch))
            if name.endswith(".json")]


def describe_loss(cause: str) -> str:
    """Celery's 'Worker exited prematurely: signal 11 (SIGSEGV) Job: 3.' -> 'its process died with SIGSEGV'."""
    m = re.search(r"signal (\d+) \((SIG\w+)\)", cause)
    if m:
        return f"its process died with {m.group(2)}" + (" (often the out-of-memory killer)"
                                                       if m.group(2) == "SIGKILL" else "")
    m = re.search(r"exitcode (\d+)", cause)
    if m:
        return f"its process exited with code {m.group(1)}"
    return re.sub(r"\s*Job: \d+\.?\s*$", "", cause).strip() or "its process died"




def _spec_or_none(raw: Any) -> JobSpec | None:
    if isinstance(raw, JobSpec):
        return raw
    try:
        return JobSpec.model_validate(raw)
    except ValueError:
        return None
