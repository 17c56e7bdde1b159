"""Getting jobs run: onto the Redis queue for workers, or right here (the embedded default, no broker).

The queue path sends by task name with JSON bodies, so the client never imports the worker's code.
The embedded path calls the very same `run_job` the worker calls, with the same step isolation.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import Any

from portq.tasks.core.contract import CONVERT_TASK, JobReport, JobSpec, new_id
from portq.tasks.core.errors import ConfigError, PortqError, StoreError, TransientError, first_line
from portq.tasks.core.settings import Settings
from portq.tasks.state import delivery
from portq.tasks.state.store import Store

#: how hard one publish tries through a broker hiccup before the job is recorded as not queued
PUBLISH_RETRY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}


def producer(settings: Settings):  # type: ignore[no-untyped-def]
    """A Celery app used only to publish and to talk to workers: JSON bodies, the workers' visibility timeout."""
    from celery import Celery

    app = Celery("portq-client", broker=settings.broker_url, set_as_current=False)
    app.conf.update(settings.wire_config(), broker_connection_retry_on_startup=False, broker_connection_timeout=5)
    return app


def check_broker(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5, timeout=5)
    except Exception as e:
        raise ConfigError(f"cannot reach the broker at {settings.broker_display}: {first_line(e)}", step="submit",
                          hint="start Redis, or unset PORTQ_BROKER_URL to run jobs locally") from None


def enqueue(specs: list[JobSpec], settings: Settings, store: Store | None = None, *, resubmit: bool = False) -> None:
    """Publish one message per job. A job that cannot be published is dead-lettered (so `portq retry` finds it).

    The first submission's Celery task id is the job id; a resubmission gets a fresh one, so a worker
    that still remembers the old id as revoked (`portq cancel`) does not drop it.
    """
    app = producer(settings)
    check_broker(app, settings)
    sent = 0
    try:
        with app.producer_or_acquire() as prod:
            for spec in specs:
                task_id = f"{spec.job_id}.{new_id()[:6]}" if resubmit else spec.job_id
                app.send_task(CONVERT_TASK, kwargs={"spec": spec.model_dump(mode="json")}, queue=spec.queue,
                              task_id=task_id, producer=prod, retry=True, retry_policy=PUBLISH_RETRY)
                sent += 1
    except Exception as e:
        cause = f"could not be queued: the broker at {settings.broker_display} failed ({first_line(e)})"
        if store is not None:
            for spec in specs[sent:]:
                delivery.dead_letter(store, spec, None, cause)
        raise TransientError(f"queued {sent} of {len(specs)} job(s); the rest {cause}", step="submit",
                             hint="they are recorded as failed; `portq retry BATCH` resubmits them") from None


def run_here(specs: list[JobSpec], store: Store, settings: Settings | None = None,
             on_done: Callable[[JobReport], None] | None = None) -> None:
    """The embedded default: the same task code, in this process, one job after another.

    Each run is admitted as a queued delivery is (`delivery.admit`): a cancelled or finished job is skipped.
    """
    from portq.tasks.execution.isolation import isolation_for
    from portq.tasks.execution.run import run_job
    from portq.tasks.state import lifecycle, records

    settings = settings or Settings.resolve(env={})
    for spec in specs:
        try:
            if not delivery.admit(store, spec, max_attempts=settings.max_retries + 1).run:
                continue
            report = run_job(spec, store, worker="embedded", isolation=isolation_for(settings))
        except (TransientError, StoreError) as e:
            with suppress(PortqError):  # the store may be what failed: then the record cannot say so either
                record = records.read_record(store, spec.batch_id, spec.job_id)
                if record is not None:
                    lifecycle.gave_up(store, record, e.message)
            continue
        if on_done:
            on_done(report)


def inspect_workers(settings: Settings, timeout: float = 2.0) -> dict[str, dict[str, Any]]:
    """Ask every worker on the broker (Celery's remote control): queues, processes, running and reserved jobs."""
    app = producer(settings)
    check_broker(app, settings)
    insp = app.control.inspect(timeout=timeout)
    replies = {"queues": insp.active_queues() or {}, "active": insp.active() or {}, "reserved": insp.reserved() or {},
               "stats": insp.stats() or {}}
    names = sorted(set().union(*(r.keys() for r in replies.values())))
    return {name: {key: reply.get(name) for key, reply in replies.items()} for name in names}


def revoke(settings: Settings, task_ids: list[str], *, terminate: bool = False) -> None:
    """Tell every worker to drop these task ids (and, with `terminate`, kill the process running one)."""
    if not task_ids:
        return
    app = producer(settings)
    check_broker(app, settings)
    app.control.revoke(task_ids, terminate=terminate, signal="SIGKILL")
