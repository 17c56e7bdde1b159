"""A Redis server of the test's own, on a free port, with persistence on, that the test may kill and restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path, *extra: str, tls: bool = False):
        if not shutil.which("redis-server"):
            if os.environ.get("PORTQ_REQUIRE_REDIS"):
                pytest.fail("redis-server is not installed; these tests start Redis servers of their own")
            pytest.skip("redis-server is not installed")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra = extra
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0, auth: str = "") -> str:
        return f"redis://{auth + '@' if auth else ''}127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        # appendonly + fsync on every write: what a restart must not lose is on disk before Redis answers
        ports = ("--port", "0", "--tls-port", str(self.port)) if self.tls else ("--port", str(self.port))
        self.proc = subprocess.Popen(
            ["redis-server", *ports, "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", *self.extra],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on {self.port} did not start:\n{(self.dir / 'redis.log').read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what was already fsynced survives."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
