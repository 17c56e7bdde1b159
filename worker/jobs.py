"""The Celery task: validate the JSON job, run it, retry only what is worth retrying.

This is the worker's error boundary. A job's own failure is recorded by `run_job` and acknowledged;
a transient storage failure is retried with backoff; a message that is not a valid job is logged and
dropped (there is nothing to convert). Nothing here imports torch: the prefork child does, on demand.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from portq.tasks.contract import CONVERT_TASK, JobSpec
from portq.tasks.errors import TransientError
from portq.tasks.settings import Settings
from portq.tasks.store import Store
from pydantic import ValidationError

log = logging.getLogger("portq.worker")


def _settings(task: Task) -> Settings:
    return task.app.conf.portq_settings  # type: ignore[no-any-return]


def convert(task: Task, spec: dict[str, Any]) -> dict[str, Any]:
    from portq.tasks.job import run_job

    try:
        job = JobSpec.model_validate(spec)
    except ValidationError as e:
        log.error("rejected a message that is not a valid portq job (version %s): %s",
                  spec.get("version") if isinstance(spec, dict) else "?", e)
        return {"status": "rejected", "error": str(e)}
    settings = _settings(task)
    store = Store(settings.store)
    try:
        report = run_job(job, store, worker=task.request.hostname)
    except TransientError as e:
        retries = task.request.retries
        log.warning("job %s: transient failure (%s); retry %d/%d", job.job_id, e, retries + 1, settings.max_retries)
        raise task.retry(exc=e, countdown=min(2 ** retries, 60), max_retries=settings.max_retries) from e
    log.info("job %s (%s): %s", job.job_id, job.model, report.status.value)
    return {"job_id": job.job_id, "status": report.status.value}


def register(app: Celery) -> None:
    app.task(name=CONVERT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)(convert)
