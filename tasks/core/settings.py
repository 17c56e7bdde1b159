"""Settings, resolved once in one validated place: flag > environment > default.

The CLI resolves them from its flags; the worker from its environment. Connections are built from a
`Settings` and passed on explicitly; nothing here is a global.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from portq.tasks.core.errors import ConfigError, validation_problems
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_STORE = "portq-store"

#: environment variable -> Settings field
ENV = {
    "PORTQ_BROKER_URL": "broker_url",
    "PORTQ_STORE": "store",
    "PORTQ_TASK_TIME_LIMIT": "task_time_limit",
    "PORTQ_VISIBILITY_TIMEOUT": "visibility_timeout",
    "PORTQ_MAX_RETRIES": "max_retries",
    "PORTQ_MAX_TASKS_PER_CHILD": "max_tasks_per_child",
    "PORTQ_MAX_MODEL_BYTES": "max_model_bytes",
    "PORTQ_MAX_SAMPLE_BYTES": "max_sample_bytes",
    "PORTQ_ISOLATE": "isolate",
    "PORTQ_STEP_TIME_LIMIT": "step_time_limit",
    "PORTQ_STEP_MEMORY_LIMIT": "step_memory_limit",
    "PORTQ_STEP_REUSE": "step_reuse",
    "PORTQ_THREADS": "threads",
    "PORTQ_NIGHTLY_MANIFESTS": "nightly_manifests",
    "PORTQ_NIGHTLY_SCHEDULE": "nightly_schedule",
}


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    broker_url: str | None = Field(None, description="redis:// or rediss:// URL; unset runs jobs locally")
    store: str = Field(DEFAULT_STORE, description="a directory, or an fsspec URL")
    task_time_limit: int = Field(3600, ge=5, description="hard limit per job, seconds")
    visibility_timeout: int = Field(7200, ge=10, description="Redis redelivers a job unacked for this long")
    max_retries: int = Field(2, ge=0, description="redeliveries after a lost worker or transient failure")
    max_tasks_per_child: int | None = Field(None, ge=1, description="recycle a worker process after this many jobs; "
                                            "default: 50, or 1000 with step isolation (see `tasks_per_child`)")
    max_model_bytes: int = Field(8 * 1024**3, ge=1, description="largest model file accepted")
    max_sample_bytes: int = Field(1024**3, ge=1, description="largest sample (.npz) file accepted")
    isolate: bool = Field(True, description="run each format step (export, compile, session, runs) in a child process")
    step_time_limit: int | None = Field(None, ge=1, description="limit per isolated format step, seconds; "
                                                                "default: what is left of the job's time limit")
    step_memory_limit: int | None = Field(None, ge=1, description="resident memory limit per isolated step, bytes")
    step_reuse: int = Field(20, ge=1, description="isolated steps one step process runs, one at a time, before a "
                            "fresh one replaces it; 1: a fresh process for every step")
    threads: int | None = Field(None, ge=1, description="CPU threads each job computes with (torch and onnxruntime); "
                                "default: the usable cores divided by the worker's concurrency")
    nightly_manifests: tuple[str, ...] = Field((), description="manifests Celery beat submits "
                                         "(paths the workers see; comma-separated in the environment)")
    nightly_schedule: str = Field("0 2 * * *", description="when beat submits them: a crontab line "
                                  "(minute hour day-of-month month day-of-week), the beat process's time zone")

    @field_validator("nightly_manifests", mode="before")
    @classmethod
    def _comma_separated(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @field_validator("nightly_schedule")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"{v!r} is not a crontab line: five fields, minute hour day-of-month month "
                             "day-of-week, e.g. '0 2 * * *'")
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker_is_redis(cls, v: str | None) -> str | None:
        if v is None or v.strip() in ("", "embedded", "local"):
            return None
        scheme = urlsplit(v).scheme
        if scheme not in ("redis", "rediss", "redis+socket"):
            raise ValueError(f"broker URL must be redis:// or rediss:// (got scheme {scheme!r})")
        return v

    @field_validator("store")
    @classmethod
    def _store_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("store must not be empty")
        if "://" not in v:
            return str(Path(v).expanduser().resolve())
        return v

    @model_validator(mode="after")
    def _limits_hold(self) -> Settings:
        # A job still running when the visibility timeout expires is delivered a second time.
        if self.task_time_limit >= self.visibility_timeout:
            raise ValueError(
                f"task_time_limit ({self.task_time_limit}s) must stay below visibility_timeout "
                f"({self.visibility_timeout}s), or Redis redelivers jobs that are still running"
            )
        if self.step_time_limit is not None and self.step_time_limit >= self.task_time_limit:
            raise ValueError(
                f"step_time_limit ({self.step_time_limit}s) must stay below task_time_limit "
                f"({self.task_time_limit}s), so a hung step is stopped before the whole job is killed"
            )
        if self.broker_url and urlsplit(self.broker_url).scheme == "rediss" and \
                "ssl_cert_reqs=" not in urlsplit(self.broker_url).query:
            raise ValueError("a rediss:// URL needs ?ssl_cert_reqs=required (or optional/none), and usually "
                             "&ssl_ca_certs=/path/ca.pem: without it the certificate check is undefined")
        return self

    def wire_config(self) -> dict[str, Any]:
        """Celery settings the workers and the clients on one broker must share (plain data: no Celery here)."""
        return {
            # Messages are JSON only: a pickled message is rejected by kombu before any task code runs.
            "task_serializer": "json",
            "accept_content": ["json"],
            "result_accept_content": ["json"],
            # State lives in the store, not in a result backend.
            "task_ignore_result": True,
            # Flower counts a job as queued from this event.
            "task_send_sent_event": True,
            # Redis redelivers a message unacknowledged for this long; the smallest value on a broker wins.
            "broker_transport_options": {"visibility_timeout": self.visibility_timeout},
        }

    @property
    def tasks_per_child(self) -> int:
        """Jobs a worker's pool process runs before a fresh one replaces it: PORTQ_MAX_TASKS_PER_CHILD, else 50 when
        jobs run in it (it holds their models and torch's caches), else 1000. Under step isolation a pool process
        never loads a model or imports torch (its step processes do, and are replaced every PORTQ_STEP_REUSE steps),
        and replacing it also restarts its step forkserver: seconds of imports, which every 50 jobs cost a batch of
        tiny jobs a tenth of its time."""
        if self.max_tasks_per_child is not None:
            return self.max_tasks_per_child
        return 1000 if self.isolate else 50

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    @property
    def broker_display(self) -> str:
        return redact_url(self.broker_url) if self.broker_url else "embedded (no broker)"

    @property
    def store_display(self) -> str:
        """The store as shown to users: no credentials, should a URL carry any."""
        return redact_url(self.store) if "://" in self.store else self.store

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
        """Flags that are not None win over the environment, which wins over defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for var, field in ENV.items():
            if env.get(var) not in (None, ""):
                values[field] = env[var]
        values.update({k: v for k, v in flags.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as e:
            raise ConfigError(validation_problems(e), step="settings",
                              hint="check PORTQ_* variables and flags") from None


def redact_url(url: str) -> str:
    """The URL without its user, password or password-like query parameters, fit to print or log."""
    parts = urlsplit(url)
    query = parts.query
    if query:
        query = "&".join(
            f"{k}=***" if k.lower() in _SECRET_PARAMS else (f"{k}={v}" if sep else k)
            for k, sep, v in (item.partition("=") for item in query.split("&"))
        )
    if parts.password is None and parts.username is None:
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, query, parts.fragment))


#: query parameters that redis-py reads as credentials
_SECRET_PARAMS = {"password", "username", "ssl_password"}
