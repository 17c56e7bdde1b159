"""Shared fixtures: example models, a store, a dedicated Redis database, and real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_BASE = os.environ.get("PORTQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")
LOCK_KEY = "portq:test-run-lock"


@pytest.fixture(scope="session")
def example_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from portq.tasks.sources.examples import write_examples

    paths = write_examples(tmp_path_factory.mktemp("models"))
    return {p.stem: p for p in paths}


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One S3-compatible server (moto) on the loopback for the test run; each test takes a bucket of its own."""
    from tests.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The standard AWS variables for the test server, set in this process (s3fs reads them) and returned for
    the processes a test starts."""
    from tests.s3_server import isolated_aws_env

    env = isolated_aws_env(s3_server.endpoint)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    forget_s3_clients()
    yield env
    forget_s3_clients()


@pytest.fixture
def s3_store(s3_server, s3_env: dict[str, str]) -> str:
    """`s3://<a fresh bucket>/portq`, reachable from this process and from those it starts with `s3_env`."""
    return f"s3://{s3_server.bucket()}/portq"


def forget_s3_clients() -> None:
    """fsspec keeps one filesystem object per set of arguments: a test that changes the AWS variables needs new
    ones (a process of a real deployment has one environment for its life)."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database of our own for this test run: claimed with a lock key, flushed before and after.

    Concurrent test runs on one Redis each claim a different database.
    """
    import redis

    try:
        redis.Redis.from_url(REDIS_BASE, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        if os.environ.get("PORTQ_REQUIRE_REDIS"):
            pytest.fail(f"Redis at {REDIS_BASE} does not answer ({e}); queue tests need it")
        pytest.skip(f"Redis at {REDIS_BASE} does not answer ({e}); start redis-server to run queue tests")
    token = uuid.uuid4().hex
    for db in range(1, 16):
        client = redis.Redis.from_url(f"{REDIS_BASE}/{db}")
        if client.set(LOCK_KEY, token, nx=True, ex=3600):
            client.flushdb()
            client.set(LOCK_KEY, token, ex=3600)
            try:
                yield f"{REDIS_BASE}/{db}"
            finally:
                client.flushdb()
            return
    pytest.fail("no free Redis database (1-15) for this test run")


@pytest.fixture
def queue_db(redis_url: str) -> Iterator[str]:
    """Flush the run's database around each queue test (keeping the run's claim on it)."""
    import redis

    client = redis.Redis.from_url(redis_url)

    def flush() -> None:
        token = client.get(LOCK_KEY)
        client.flushdb()
        if token:
            client.set(LOCK_KEY, token, ex=3600)

    flush()
    yield redis_url
    flush()


class WorkerProcess:
    """A real `portq worker` process, started by the test and stopped (or killed) by it."""

    def __init__(self, broker: str, store: Path, queue: str, log: Path, concurrency: int = 1,
                 env: dict[str, str] | None = None):
        self.log = log
        self.name = f"test-{queue}-{uuid.uuid4().hex[:6]}@%h"
        full_env = {**os.environ, "PORTQ_BROKER_URL": broker, "PORTQ_STORE": str(store), "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "portq.client", "worker", "--queue", queue, "--concurrency", str(concurrency),
             "--name", self.name, "--loglevel", "INFO"],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 90) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if " ready." in self.log.read_text():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log.read_text()}")

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int | None = None) -> None:
        import signal

        if self.proc.poll() is None:
            if sig is None:  # a warm shutdown, as `docker stop` does it: the main process finishes its jobs
                os.kill(self.proc.pid, signal.SIGTERM)
            else:
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log_file.close()


@pytest.fixture
def start_worker(queue_db: str, store_dir: Path, tmp_path: Path) -> Iterator:
    workers: list[WorkerProcess] = []

    def start(queue: str = "cpu", concurrency: int = 1, env: dict[str, str] | None = None) -> WorkerProcess:
        w = WorkerProcess(queue_db, store_dir, queue, tmp_path / f"worker-{len(workers)}.log", concurrency, env)
        workers.append(w)
        return w.wait_ready()

    yield start
    for w in workers:
        w.stop()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `portq` entry point in a subprocess (as a user would), in `cwd` if given."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "portq.client", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)
