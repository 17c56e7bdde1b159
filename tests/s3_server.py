"""An S3-compatible server of the test's own on the loopback (moto's server mode), reached through s3fs as a
user's workers would, and a TCP proxy in front of it that a test can cut to make the store unreachable.

Every process a test starts gets the server's address and credentials the standard AWS way (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), with the shared AWS config files and the instance metadata lookup
turned off, so nothing outside this machine is ever asked for credentials.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from tests.redis_server import free_port

#: the secret key every test process gets; tests grep logs, reports and output for it
SECRET = "portq-TEST-secret-7f3a9c1e5b"
ACCESS_KEY = "AKIAPORTQTESTKEY0001"


def isolated_aws_env(endpoint: str | None, *, key: str | None = ACCESS_KEY,
                     secret: str | None = SECRET) -> dict[str, str]:
    """AWS settings for one endpoint and nothing else: no shared config, no metadata service, few retries."""
    env = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           # botocore retries a refused connection for seconds; two attempts keep the failure tests short
           "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    if key and secret:
        env |= {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    return env


class S3Server:
    """`python -m moto.server` on a free loopback port. `env` is passed to the server (e.g.
    INITIAL_NO_AUTH_ACTION_COUNT, which makes moto enforce IAM policies after that many requests)."""

    def __init__(self, directory: Path, env: dict[str, str] | None = None):
        try:
            import moto.server  # noqa: F401
            import s3fs  # noqa: F401
        except ImportError as e:
            pytest.skip(f"the S3 tests need moto[server] and s3fs (pip install -e '.[test]'): {e}")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.server_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(self.dir / "moto.log", "ab"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.server_env}, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited:\n{(self.dir / 'moto.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"moto server on {self.port} did not start:\n{(self.dir / 'moto.log').read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def client(self, service: str = "s3", **credentials: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=credentials.get("key", ACCESS_KEY),
                            aws_secret_access_key=credentials.get("secret", SECRET))

    def bucket(self, prefix: str = "portq") -> str:
        """A fresh bucket; returns its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


class TcpProxy:
    """A loopback TCP proxy to `target_port`. `cut()` closes the listener and every open connection (the store
    becomes unreachable: connections are refused), `restore()` listens again on the same port."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for c in self._conns:
                with suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
