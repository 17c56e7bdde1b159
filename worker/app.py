"""The Celery application: JSON-only messages, late acknowledgement, one task prefetched per process.

`celery -A portq.worker.app worker -Q cpu` works as well as `portq worker --queue cpu`. Settings come
from the environment (PORTQ_*), resolved once when this module is imported; invalid settings stop the
worker from starting with a message saying which one.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue
from portq.tasks.contract import QUEUES
from portq.tasks.settings import Settings
from portq.worker import gpu  # noqa: F401  (connects the per-child GPU pinning signal)

#: The hard limit kills the job; the soft limit, this much earlier, lets the job record why it stopped.
SOFT_LIMIT_MARGIN_S = 15


def celery_config(settings: Settings) -> dict[str, object]:
    """Configuration shared by the worker and the client that sends to it."""
    return {
        # Messages are JSON only: a pickled message is rejected by kombu before any task code runs.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "event_serializer": "json",
        "result_accept_content": ["json"],
        # State lives in the store, not in a result backend.
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # Acknowledge after the job ran, and put it back if the worker process died under it.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": max(1, settings.task_time_limit - SOFT_LIMIT_MARGIN_S),
        # Redis redelivers a message unacknowledged for this long; the time limit stays below it.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "task_queues": [Queue(q) for q in QUEUES],
        "task_default_queue": QUEUES[0],
        "task_create_missing_queues": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_max_tasks_per_child": settings.max_tasks_per_child,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def make_app(settings: Settings) -> Celery:
    app = Celery("portq", broker=settings.broker_url, set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.portq_settings = settings
    from portq.worker import jobs  # registers the task on this app

    jobs.register(app)
    return app


settings = Settings.resolve()
app = make_app(settings)
