"""The Celery task: validate the JSON job, decide what this delivery does, run it, retry only what is worth it.

This is the worker's error boundary. A job's own failure is recorded by `run_job` and acknowledged (the
task then raises `JobFailed`, so Celery events, Flower and its Prometheus metrics count it as failed);
a transient storage failure is retried with backoff, then dead-lettered; a message that is not a valid
job is rejected without requeueing. `JobRequest` runs in the worker's main process and records what
the job's own process cannot: that it died (segfault, OOM kill), or was killed at the time limit.
Nothing here imports torch: with step isolation on (the default) a job's source and steps run in step processes
forked from the forkserver that imported it; with it off, the prefork child imports it (`portq.worker.warm`).
"""

from __future__ import annotations

import glob
import logging
import shutil
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.worker.request import Request
from portq.tasks.core.contract import CONVERT_TASK, SAFE_ID, JobSpec, JobStatus
from portq.tasks.core.errors import InputError, PortqError, StoreError, TransientError
from portq.tasks.core.settings import Settings
from portq.tasks.execution.run import workdir_glob
from portq.tasks.state import delivery
from portq.tasks.state.store import Store
from pydantic import ValidationError

log = logging.getLogger("portq.worker")


class JobFailed(Exception):
    """The job ran and was recorded as failed; raised so that Celery reports the task as failed."""


def settings_of(app: Celery) -> Settings:
    return app.portq_settings  # type: ignore[attr-defined,no-any-return]


def retry_countdown(retries: int, settings: Settings) -> int:
    """Exponential backoff, capped well below the visibility timeout (a waiting retry is unacknowledged)."""
    return int(max(1, min(2 ** retries, 60, settings.visibility_timeout // 4)))


def convert(task: Task, spec: dict[str, Any], store: str | None = None) -> dict[str, Any]:
    from portq.tasks.execution.isolation import isolation_for
    from portq.tasks.execution.run import run_job

    started = time.monotonic()
    settings = settings_of(task.app)
    client_store, store = store, Store(settings.store)
    try:
        job = JobSpec.model_validate(spec)
    except ValidationError as e:
        problem = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        log.error("rejected a message that is not a valid portq job: %s", problem)
        delivery.reject_message(store, spec, problem)
        raise Reject(f"not a valid portq job: {problem}", requeue=False) from None
    if task.request.retries > settings.max_retries:
        # a job that used up its retries while the store was down: record the failure now that it may be up
        reason = (f"gave up after {settings.max_retries + 1} attempts with transient failures (the store was "
                  "unreachable; see the worker log)")
        if _dead_letter_quietly(store, job, reason):
            raise JobFailed(reason)
        raise task.retry(countdown=retry_countdown(64, settings), max_retries=None)
    try:
        admission = delivery.admit(store, job, max_attempts=settings.max_retries + 1)
        if admission.missing:
            reason = _not_in_this_store(store, job, client_store)
            log.error("job %s (%s): %s", job.job_id, job.model, reason)
            _refuse_where_the_client_reads(task, store, job, client_store, reason)
            raise JobFailed(reason)
        if not admission.run:
            log.info("job %s (%s): %s; not run again", job.job_id, job.model, admission.reason)
            return {"job_id": job.job_id, "status": "skipped", "reason": admission.reason}
        too_big = _over_limits(store, job, settings)
        if too_big:
            delivery.refuse(store, job, too_big)
            raise JobFailed(too_big)
        report = run_job(job, store, worker=task.request.hostname, isolation=isolation_for(settings, started))
    except (TransientError, StoreError) as e:
        retries = task.request.retries
        if retries >= settings.max_retries:
            reason = f"gave up after {retries + 1} attempts with transient failures; the last: {e.message}"
            log.error("job %s: %s", job.job_id, reason)
            if not _dead_letter_quietly(store, job, reason):
                # The store itself is down, so not even the failure can be recorded: keep the job (retrying at
                # the longest backoff) rather than drop it with its record saying it still runs.
                countdown = retry_countdown(64, settings)
                log.error("job %s: cannot record its failure either; retrying in %ds", job.job_id, countdown)
                raise task.retry(exc=e, countdown=countdown, max_retries=None) from None
            raise JobFailed(reason) from None
        countdown = retry_countdown(retries, settings)
        log.warning("job %s: transient failure (%s); retry %d of %d in %ds", job.job_id, e.message, retries + 1,
                    settings.max_retries, countdown)
        _note_retry(store, job, f"transient failure ({e.message}); retry {retries + 1} in {countdown}s")
        raise task.retry(exc=e, countdown=countdown, max_retries=settings.max_retries) from None
    log.info("job %s (%s): %s%s", job.job_id, job.model, report.status.value, " (cached)" if report.cached else "")
    if report.status is JobStatus.failed:
        raise JobFailed(report.error or "failed")
    return {"job_id": job.job_id, "status": report.status.value, "cached": report.cached}


def _not_in_this_store(store: Store, job: JobSpec, client_store: str | None) -> str:
    """Why a job with no record here cannot run: it was submitted to another store (the client's, when the
    message names it)."""
    refs = [*job.source.model_files(), *job.source.data_files()]
    inputs = "nor its inputs" if not any(store.exists(r.key) for r in refs) else "(its inputs are)"
    where = f"store {client_store}" if client_store else "another store (the client did not say which)"
    return InputError(f"this job's record is not in this worker's store {store.display} {inputs}; it was submitted "
                      f"to {where}", step="receive",
                      hint=f"start the worker with PORTQ_STORE={client_store or '<the client store>'}, or submit "
                           "with the worker's store").message


def _refuse_where_the_client_reads(task: Task, store: Store, job: JobSpec, client_store: str | None,
                                   reason: str) -> None:
    """Record the refusal in the client's store when this worker reaches it and the job's record is there;
    otherwise on the broker, where the client's wait loop looks (`portq.client.dispatch.collect_refusals`)."""
    from portq.tasks.state import lifecycle, records

    if client_store and client_store != store.display:
        try:
            theirs = Store(client_store)
            record = records.read_record(theirs, job.batch_id, job.job_id)
            if record is not None and not record.status.finished:
                lifecycle.refused(theirs, record, reason)
                return
        except PortqError as e:
            log.info("job %s: cannot record its refusal in store %s: %s", job.job_id, client_store, e.message)
    try:
        with task.app.connection_for_write() as conn:
            client = conn.default_channel.client  # the Redis transport's client
            key = f"portq:refused:{job.batch_id}"
            client.hset(key, job.job_id, reason)
            client.expire(key, 7 * 24 * 3600)
    except Exception as e:  # noqa: BLE001  (a broker that is not Redis, or is gone: the log has it)
        log.error("job %s: cannot leave its refusal on the broker either: %s", job.job_id, e)


def _over_limits(store: Store, job: JobSpec, settings: Settings) -> str | None:
    """Size limits hold on the worker too: a message can come from anywhere that reaches the broker."""
    refs = [(ref, settings.max_model_bytes, "PORTQ_MAX_MODEL_BYTES") for ref in job.source.model_files()]
    refs += [(ref, settings.max_sample_bytes, "PORTQ_MAX_SAMPLE_BYTES") for ref in job.source.data_files()]
    if job.options.sample is not None:
        refs.append((job.options.sample, settings.max_sample_bytes, "PORTQ_MAX_SAMPLE_BYTES"))
    for ref, limit, var in refs:
        try:
            size = max(ref.size, store.size(ref.key))
        except PortqError as e:  # a missing input is the job's own failure; run_job reports it
            log.debug("size check of %s: %s", ref.key, e)
            continue
        if size > limit:
            return InputError(f"file is {size} bytes, over this worker's limit of {limit}", step="receive",
                              file=ref.name, hint=var).message
    return None


def _note_retry(store: Store, job: JobSpec, note: str) -> None:
    from portq.tasks.state import lifecycle, records

    try:
        record = records.read_record(store, job.batch_id, job.job_id)
        if record is not None and not record.status.finished:
            lifecycle.requeued(store, record, note)
    except PortqError:
        pass  # the store is what failed; the retry will find out


def _dead_letter_quietly(store: Store, job: JobSpec, reason: str) -> bool:
    """Dead-letter the job; False when the store cannot take even that."""
    from portq.tasks.state import records as batches

    try:
        delivery.dead_letter(store, job, batches.read_record(store, job.batch_id, job.job_id), reason)
    except PortqError as e:
        log.error("job %s: cannot record its dead letter either: %s", job.job_id, e.message)
        return False
    return True


# ------------------------------------------------------------------------------- in the worker's main process


def _job_kwargs(request: Request) -> Any:
    return (request.kwargs or {}).get("spec")


def _remove_job_tempdirs(raw: Any) -> None:
    """A killed job's process could not remove its working folder; its parent does."""
    job_id = raw.get("job_id") if isinstance(raw, dict) else None
    if isinstance(job_id, str) and SAFE_ID.match(job_id):
        for path in glob.glob(workdir_glob(job_id)):
            shutil.rmtree(path, ignore_errors=True)


class JobRequest(Request):
    """Celery's request, plus what the worker's main process records when a job's process is gone."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:
            settings = settings_of(self.task.app)
            raw = _job_kwargs(self)
            try:
                delivery.time_limit_exceeded(Store(settings.store), raw, timeout)
            except PortqError as e:
                log.error("job %s hit the time limit; cannot record it: %s", self.id, e.message)
            _remove_job_tempdirs(raw)
        super().on_timeout(soft, timeout)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        from billiard.exceptions import WorkerLostError
        from celery.exceptions import Terminated

        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, Terminated):  # `portq cancel --terminate` killed it
            settings = settings_of(self.task.app)
            raw = _job_kwargs(self)
            try:
                delivery.terminated(Store(settings.store), raw)
            except PortqError as e:
                log.error("job %s was terminated; cannot record it: %s", self.id, e.message)
            _remove_job_tempdirs(raw)
        elif isinstance(exc, WorkerLostError):
            settings = settings_of(self.task.app)
            raw = _job_kwargs(self)
            try:
                record = delivery.worker_lost(Store(settings.store), raw, str(exc), settings.max_retries + 1)
                if record is not None:
                    log.warning("job %s (%s): %s", record.job_id, record.model, record.error)
            except PortqError as e:
                log.error("job %s lost its worker process; cannot record it: %s", self.id, e.message)
            _remove_job_tempdirs(raw)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def guarded_strategy(task: Task, app: Celery, consumer: Any, **kwargs: Any) -> Any:
    """Celery's message handler for this task, made to refuse a malformed body instead of dying on it.

    A JSON message whose body is not Celery's `[args, kwargs, embed]` makes the stock handler raise a
    ValueError that stops the whole worker ("Unrecoverable error"); anyone who can reach the broker
    could stop every worker that way. Here it becomes an invalid message: logged, rejected, dropped.
    """
    from celery.exceptions import InvalidTaskError
    from celery.worker.strategy import default

    handler = default(task, app, consumer, **kwargs)

    def handle(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        try:
            return handler(message, body, ack, reject, callbacks, **kw)
        except (ValueError, TypeError, AttributeError) as e:
            raise InvalidTaskError(f"malformed {task.name} message: {type(e).__name__}: {e}") from e

    return handle


class JobTask(Task):
    Request = JobRequest
    Strategy = "portq.worker.task:guarded_strategy"
    throws = (JobFailed,)  # an expected outcome: logged in one line, without a traceback


def register(app: Celery) -> None:
    app.task(name=CONVERT_TASK, bind=True, base=JobTask, acks_late=True, reject_on_worker_lost=True)(convert)

