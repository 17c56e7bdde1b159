"""Getting jobs run: onto the Redis queue for workers, or right here (the embedded default, no broker).

The queue path sends by task name with JSON bodies, so the client never imports the worker's code.
The embedded path calls the very same `run_job` the worker calls.
"""

from __future__ import annotations

from collections.abc import Callable

from portq.tasks.contract import CONVERT_TASK, JobReport, JobSpec, JobStatus
from portq.tasks.errors import ConfigError, TransientError, first_line
from portq.tasks.settings import Settings
from portq.tasks.store import Store


def producer(settings: Settings):  # type: ignore[no-untyped-def]
    """A Celery app used only to publish: JSON bodies, the same visibility timeout as the workers."""
    from celery import Celery

    app = Celery("portq-client", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=False,
        broker_connection_timeout=5,
        task_ignore_result=True,
    )
    return app


def check_broker(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5, timeout=5)
    except Exception as e:
        raise ConfigError(f"cannot reach the broker at {settings.broker_display}: {first_line(e)}", step="submit",
                          hint="start Redis, or unset PORTQ_BROKER_URL to run jobs locally") from None


def enqueue(specs: list[JobSpec], settings: Settings) -> None:
    app = producer(settings)
    check_broker(app, settings)
    with app.producer_or_acquire() as prod:
        for spec in specs:
            app.send_task(CONVERT_TASK, kwargs={"spec": spec.model_dump(mode="json")}, queue=spec.queue,
                          task_id=spec.job_id, producer=prod)


def run_here(specs: list[JobSpec], store: Store, on_done: Callable[[JobReport], None] | None = None) -> None:
    """The embedded default: the same task code, in this process, one job after another."""
    from portq.tasks.job import run_job

    for spec in specs:
        try:
            report = run_job(spec, store, worker="embedded")
        except TransientError as e:
            from portq.tasks import batches

            record = batches.read_record(store, spec.batch_id, spec.job_id)
            if record is not None:
                record.status, record.error = JobStatus.failed, e.message
                batches.write_record(store, record)
            continue
        if on_done:
            on_done(report)
