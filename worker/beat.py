"""Nightly manifests on Celery beat: a schedule entry per manifest, and the task that submits one night of it.

    export PORTQ_BROKER_URL=redis://host:6379/0 PORTQ_STORE=/shared/portq
    export PORTQ_NIGHTLY_MANIFESTS=/shared/manifests/nightly.yaml PORTQ_NIGHTLY_SCHEDULE="0 2 * * *"
    celery -A portq.worker.app beat -s /var/lib/portq/beat-schedule    # one beat process per broker
    portq worker --queue cpu                                             # any cpu worker runs the night

At each time the crontab names, beat sends `portq.nightly` (kwargs: the manifest's path) to the `cpu` queue.
A worker runs it: it reads the manifest (a path the workers see), uploads its models into the store, records
the night in its series and queues the night's jobs, exactly as `portq submit --manifest` does. Unchanged
models come back from the content cache, so a quiet night costs almost nothing.

The trigger is acknowledged when it arrives, unlike conversion jobs: a redelivered trigger would submit a
second night, while a lost one shows as a missing night in `portq history` and is resubmitted by hand.
Nothing here imports torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.schedules import crontab
from portq.tasks.core.contract import CONVERT_TASK, JobSpec, safe_name
from portq.tasks.core.errors import ConfigError, PortqError, TransientError, first_line
from portq.tasks.core.settings import Settings
from portq.tasks.state import delivery
from portq.tasks.state.store import Store

log = logging.getLogger("portq.worker")

NIGHTLY_TASK = "portq.nightly"
#: any cpu worker can submit a night: it uploads files and publishes messages, it converts nothing
NIGHTLY_QUEUE = "cpu"
PUBLISH_RETRY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}


class NightFailed(Exception):
    """The manifest could not be submitted (logged with its reason); raised so Celery counts the task failed."""


def crontab_of(line: str) -> crontab:
    """`0 2 * * *` (minute hour day-of-month month day-of-week) as Celery's crontab."""
    minute, hour, day_of_month, month_of_year, day_of_week = line.split()
    try:
        return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                       day_of_week=day_of_week)
    except ValueError as e:
        raise ConfigError(f"PORTQ_NIGHTLY_SCHEDULE {line!r} is not a valid crontab line: {e}", step="beat",
                          hint="five fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *'") from None


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """One entry per manifest in PORTQ_NIGHTLY_MANIFESTS, all at PORTQ_NIGHTLY_SCHEDULE."""
    schedule: dict[str, dict[str, Any]] = {}
    for manifest in settings.nightly_manifests:
        name = f"nightly-{safe_name(Path(manifest).stem)}"
        if name in schedule:
            raise ConfigError(f"two nightly manifests are named {Path(manifest).stem!r}", step="beat",
                              hint="give each manifest in PORTQ_NIGHTLY_MANIFESTS its own file name")
        schedule[name] = {"task": NIGHTLY_TASK, "schedule": crontab_of(settings.nightly_schedule),
                          "kwargs": {"manifest": manifest}, "options": {"queue": NIGHTLY_QUEUE}}
    return schedule


def publish(app: Celery, specs: list[JobSpec], store: Store) -> None:
    """Queue the night's jobs from inside a worker; a job that cannot be published is dead-lettered."""
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for spec in specs:
                app.send_task(CONVERT_TASK, kwargs={"spec": spec.model_dump(mode="json")}, queue=spec.queue,
                              task_id=spec.job_id, producer=producer, retry=True, retry_policy=PUBLISH_RETRY)
                sent += 1
    except Exception as e:
        cause = f"could not be queued: the broker failed ({first_line(e)})"
        for spec in specs[sent:]:
            delivery.not_sent(store, spec, cause)
        raise TransientError(f"queued {sent} of {len(specs)} job(s); the rest {cause}", step="beat",
                             hint="they are recorded as failed; `portq retry BATCH` resubmits them") from None


def submit_manifest(app: Celery, manifest: str) -> dict[str, Any]:
    """The task's body: one night of the manifest, its jobs queued. Raises PortqError."""
    from portq.tasks.execution.night import submit_night

    settings: Settings = app.portq_settings  # type: ignore[attr-defined]
    store = Store(settings.store)
    night = submit_night(manifest, store, max_bytes=settings.max_model_bytes,
                         max_sample_bytes=settings.max_sample_bytes)
    for warning in night.warnings:
        log.warning("nightly %s: %s", night.series, warning)
    publish(app, night.specs, store)
    log.info("nightly %s: batch %s, %d job(s) queued, %d refused", night.series, night.batch, len(night.specs),
             len(night.rejected))
    return {"series": night.series, "batch": night.batch, "jobs": len(night.specs), "rejected": len(night.rejected),
            "warnings": night.warnings}


def nightly(task: Task, manifest: str) -> dict[str, Any]:
    """`portq.nightly`: the worker's error boundary for a scheduled night."""
    try:
        return submit_manifest(task.app, manifest)
    except PortqError as e:
        log.error("nightly manifest %s not submitted: %s", manifest, e.message)
        raise NightFailed(e.message) from None


class NightlyTask(Task):
    throws = (NightFailed,)  # an expected outcome: logged in one line, without a traceback


def register(app: Celery, settings: Settings) -> None:
    """The task on the app (every worker knows it) and, where manifests are configured, the beat schedule."""
    app.task(name=NIGHTLY_TASK, bind=True, base=NightlyTask, acks_late=False)(nightly)
    app.conf.beat_schedule = beat_schedule(settings)
