"""The Celery application: JSON-only messages, late acknowledgement, one task prefetched per process.

`celery -A portq.worker.app worker -Q cpu` works as well as `portq worker --queue cpu`, and
`celery -A portq.worker.app beat` schedules nightly manifests (`portq.worker.beat`). Settings come
from the environment (PORTQ_*), resolved once when this module is imported; invalid settings stop the
worker from starting with a message saying which one. A worker also refuses to start when its
effective hard time limit (after Celery's own `--time-limit`) is not below the visibility timeout.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import cached_property
from typing import Any

from celery import Celery
from celery.apps.worker import Worker
from celery.signals import worker_init, worker_process_init, worker_ready
from kombu import Queue
from portq.tasks.core.contract import QUEUES
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.settings import Settings
from portq.worker import (
    gpu,  # noqa: F401  (connects the per-child GPU pinning signal, before `_warm_child` below)
    warm,
)
from portq.worker.redact import Redactor, environment_secrets, install

log = logging.getLogger("portq.worker")

#: exit status of a worker that refuses its configuration (sysexits' EX_CONFIG)
EX_CONFIG = 78
#: exit status of a worker whose store does not answer or refuses its writes (sysexits' EX_UNAVAILABLE)
EX_UNAVAILABLE = 69


def restore_interval(visibility_timeout: int) -> int:
    """How often a worker looks for unacknowledged messages older than the visibility timeout."""
    return max(1, min(60, visibility_timeout // 20))


def celery_config(settings: Settings) -> dict[str, object]:
    """The worker's configuration: what every party on the broker shares (`Settings.wire_config`), and more."""
    wire = settings.wire_config()
    return {
        **wire,
        "result_serializer": "json",
        "event_serializer": "json",
        "task_store_errors_even_if_ignored": False,
        # Acknowledge after the job ran, and put it back if the worker process died under it.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        # A hard limit only: the job's own process is killed, and the worker's main process records why.
        # (Isolated format steps get their own limits inside the job's, so a slow step is stopped first.)
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": None,
        "broker_transport_options": {
            # the time limit stays below the visibility timeout (checked at start-up)
            **wire["broker_transport_options"],
            # kombu's default sweep for such messages runs every 10 s x 10 = 100 s; keep it in step.
            "unacked_restore_interval": restore_interval(settings.visibility_timeout),
            "unacked_restore_throttle": 1,
        },
        "broker_connection_retry_on_startup": True,
        # Keep reconnecting through a broker restart, however long it takes.
        "broker_connection_max_retries": None,
        "task_queues": [Queue(q) for q in QUEUES],
        "task_default_queue": QUEUES[0],
        "task_create_missing_queues": False,
        # Events for Flower (and its Prometheus /metrics): sent, received, started, succeeded, failed.
        "worker_send_task_events": True,
        "worker_max_tasks_per_child": settings.tasks_per_child,
        # A running job survives a broker hiccup; its redelivery (if any) finds it finished and skips it.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


class PortqWorker(Worker):
    """Celery's worker program, with the broker's credentials kept out of its banner and logs."""

    def setup_logging(self, colorize: bool | None = None) -> Any:
        custom = super().setup_logging(colorize)
        install(self._redactor())
        return custom

    def startup_info(self, artlines: bool = True) -> str:
        return self._redactor()(super().startup_info(artlines))

    def _redactor(self) -> Redactor:
        settings = getattr(self.app, "portq_settings", None)
        return Redactor(settings.broker_url if settings else self.app.conf.broker_url, secrets=environment_secrets(),
                        store=settings.store if settings else None)


class PortqCelery(Celery):
    @cached_property
    def Worker(self) -> Any:  # noqa: N802  (Celery's name)
        return self.subclass_with_self(PortqWorker)


def make_app(settings: Settings) -> Celery:
    app = PortqCelery("portq", broker=settings.broker_url, set_as_current=False)
    app.conf.update(celery_config(settings))
    # An attribute, not a conf key: `celery inspect conf` would show a conf key, password and all.
    app.portq_settings = settings  # type: ignore[attr-defined]
    from portq.worker import beat, task

    task.register(app)
    beat.register(app, settings)  # the nightly task, and beat's schedule where manifests are configured
    return app


def limits_problem(time_limit: float | None, visibility_timeout: float | None) -> str | None:
    """Why a worker with these limits would run jobs twice (None when it would not)."""
    if not visibility_timeout:
        return None
    if not time_limit:
        return (f"no hard time limit is set, so a job running longer than the visibility timeout "
                f"({visibility_timeout:g}s) would be delivered to a second worker while it still runs")
    if time_limit >= visibility_timeout:
        return (f"the hard time limit ({time_limit:g}s) is not below the visibility timeout ({visibility_timeout:g}s), "
                "so a job still running when Redis redelivers it would run twice")
    return None


@worker_init.connect
def _share_cores(sender: Any = None, **_: Any) -> None:
    """Before the pool forks: its processes split this host's cores between them (portq.tasks.checks.threads)."""
    from portq.tasks.checks.threads import POOL_PROCESSES_ENV

    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0:
        os.environ[POOL_PROCESSES_ENV] = str(concurrency)


@worker_init.connect
def _refuse_unsafe_limits(sender: Any = None, **_: Any) -> None:
    """At start-up, after Celery's own options (`--time-limit`) were applied: refuse limits that double work."""
    app = getattr(sender, "app", None)
    if app is None or not hasattr(app, "portq_settings"):
        return
    problem = limits_problem(getattr(sender, "time_limit", None),
                             (app.conf.broker_transport_options or {}).get("visibility_timeout"))
    if problem:
        message = "[error] " + ConfigError(f"refusing to start: {problem}", step="worker",
                                           hint="set PORTQ_TASK_TIME_LIMIT below PORTQ_VISIBILITY_TIMEOUT").message
        log.critical(message)
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(EX_CONFIG)


@worker_init.connect
def _refuse_unusable_store(sender: Any = None, **_: Any) -> None:
    """At start-up: a store this worker cannot reach or write to (unknown scheme, endpoint down, no bucket, no
    credentials, read-only) stops it with one sentence naming the store, instead of failing every job."""
    from portq.tasks.core.errors import PortqError
    from portq.tasks.state.store import Store

    app = getattr(sender, "app", None)
    settings: Settings | None = getattr(app, "portq_settings", None)
    if settings is None:
        return
    try:
        Store(settings.store).check()
    except PortqError as e:
        message = f"[error] refusing to start: {e.message}"
        log.critical(message)
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(EX_CONFIG if isinstance(e, ConfigError) else EX_UNAVAILABLE) from None


@worker_process_init.connect
def _warm_child(**_: object) -> None:
    """Each pool process warms up once forked (connected after the GPU pinning, so it runs after it)."""
    warm.start(isolate=app.portq_settings.isolate)  # type: ignore[attr-defined]


@worker_ready.connect
def _sweep(sender: Any = None, **_: Any) -> None:
    """Remove what writers killed half-way left behind (store staging, local job folders): older than any job."""
    import glob
    import os
    import shutil
    import time

    from portq.tasks.core.errors import PortqError
    from portq.tasks.execution.run import workdir_glob
    from portq.tasks.state.store import Store

    app = getattr(sender, "app", None)
    settings: Settings | None = getattr(app, "portq_settings", None)
    if settings is None:
        return
    try:
        removed = Store(settings.store).sweep_staging(older_than_s=settings.visibility_timeout)
    except (PortqError, OSError) as e:
        log.warning("could not sweep the store's staging area: %s", e)
        removed = 0
    cutoff = time.time() - settings.visibility_timeout
    for path in glob.glob(workdir_glob()):
        try:
            if os.path.getmtime(path) < cutoff:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    if removed:
        log.info("swept %d leftover staging entries and job folders", removed)


settings = Settings.resolve()
app = make_app(settings)
