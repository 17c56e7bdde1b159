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
    """Publish one message per job. A job that cannot be published (the broker is down) is recorded as not sent,
    failed with the reason and dead-lettered, so `portq retry` sends it once the broker is back.

    The first submission's Celery task id is the job id; a resubmission gets a fresh one, so a worker
    that still remembers the old id as revoked (`portq cancel`) does not drop it.
    """
    app = producer(settings)
    where = store_location(store) if store is not None else None

    def kwargs(spec: JobSpec) -> dict[str, Any]:
        return {"spec": spec.model_dump(mode="json"), **({"store": where} if where else {})}

    try:
        check_broker(app, settings)
    except ConfigError as e:
        if store is not None:  # none of them will be sent: not left queued forever, and `portq retry` finds them
            for spec in specs:
                delivery.not_sent(store, spec, f"the broker at {settings.broker_display} did not answer")
        raise ConfigError(e.cause, step="submit", hint=f"{e.hint}; the job(s) are recorded as not sent, and "
                                                       "`portq retry BATCH` sends them once the broker is up") from None
    sent = 0
    try:
        with app.producer_or_acquire() as prod:
            for spec in specs:
                task_id = f"{spec.job_id}.{new_id()[:6]}" if resubmit else spec.job_id
                app.send_task(CONVERT_TASK, kwargs=kwargs(spec), queue=spec.queue,
                              task_id=task_id, producer=prod, retry=True, retry_policy=PUBLISH_RETRY)
                sent += 1
    except Exception as e:
        cause = f"could not be queued: the broker at {settings.broker_display} failed ({first_line(e)})"
        if store is not None:
            for spec in specs[sent:]:
                delivery.not_sent(store, spec, cause)
        raise TransientError(f"queued {sent} of {len(specs)} job(s); the rest {cause}", step="submit",
                             hint="they are recorded as failed; `portq retry BATCH` resubmits them") from None


def store_location(store: Store) -> str:
    """Where the client's store is, for a worker to name it (or write there): an absolute path for a directory
    (the default `./portq-store` is relative to each process), a URL without credentials otherwise."""
    return store.url("").rstrip("/") or store.display


#: a Redis hash per batch: job id -> why a worker refused it when it could not write to the client's store
REFUSALS_KEY = "portq:refused:{batch}"


def collect_refusals(settings: Settings, store: Store, batch: str) -> int:
    """Record in the client's store the jobs a worker refused without reaching it (a worker on another store);
    how many. Best effort: a broker that does not answer here is left to the wait loop's next poll."""
    import redis
    from portq.tasks.state import lifecycle, records

    try:
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
        found = client.hgetall(REFUSALS_KEY.format(batch=batch))
    except Exception:  # noqa: BLE001  (any broker trouble: try again at the next poll)
        return 0
    done = 0
    for job_id, reason in found.items():
        record = records.read_record(store, batch, job_id.decode())
        if record is not None and not record.status.finished:
            lifecycle.refused(store, record, reason.decode())
            done += 1
    return done


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
