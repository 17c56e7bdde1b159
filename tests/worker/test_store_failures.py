"""The store failing under a running batch, through Redis and real workers: a directory store that fills up
mid-write (a small tmpfs) and an object store that becomes unreachable (a proxy in front of the S3 server, cut
and restored). Each is a clear message, retried and then dead-lettered by the usual rules; no partial result is
ever visible, and no job is succeeded without its artifacts."""

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from portq.tasks.core.contract import JobStatus
from portq.tasks.state import records as batches
from portq.tasks.state.store import COMMIT, STAGING, Store

from tests.conftest import WorkerProcess, run_cli
from tests.s3_server import TcpProxy, isolated_aws_env
from tests.worker.test_delivery import FAST, slow_models, submit_args, wait_for

pytestmark = pytest.mark.queue


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs, as a store that fills up; skipped where this sandbox may not mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def big_model(directory: Path) -> Path:
    """A 1.9 MiB TorchScript model: its upload fits the small disk, its result folder (an ONNX copy of the
    weights, reports, samples) does not."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    path = directory / "wide.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(700, 700)), str(path))
    np.savez(path.with_suffix(".npz"), x=np.random.default_rng(0).standard_normal((2, 700)).astype(np.float32))
    return path


def test_a_directory_store_that_fills_up_fails_the_job_cleanly(tmp_path, queue_db, small_disk):
    store = small_disk / "store"
    env = {**FAST, "PORTQ_MAX_RETRIES": "1"}
    worker = WorkerProcess(queue_db, store, "cpu", tmp_path / "w.log", env=env).wait_ready()
    try:
        res = run_cli("submit", str(big_model(tmp_path / "models")), "--batch", "full", "--runs", "2", "--wait",
                      "--timeout", "180", env={**env, "PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": str(store)})
    finally:
        worker.stop()
    assert res.returncode == 1, res.stderr + worker.output()
    (rec,) = batches.list_records(Store(str(store)), "full")
    assert rec.status is JobStatus.failed and rec.dead_letter and rec.result is None
    assert "gave up after 2 attempts with transient failures" in rec.error
    assert "No space left on device" in rec.error and f"cannot publish {store}/results/" in rec.error
    assert "retry 1 of 1 in" in worker.output() and "retry 2 of" not in worker.output()  # the usual rule
    assert not (store / "results").exists() or not list((store / "results").iterdir())  # nothing partial
    assert not list((store / STAGING).iterdir())  # the staging copies were removed
    assert json.loads((store / rec.dead_letter).read_text())["reason"].startswith("gave up after 2 attempts")


@pytest.mark.slow  # about a minute: a worker's first job, an outage, its retry
def test_an_object_store_that_goes_away_mid_batch_loses_nothing_and_shows_nothing_partial(
        tmp_path, queue_db, s3_server, s3_store, s3_env):
    proxy = TcpProxy(s3_server.port).restore()
    through_proxy = {**isolated_aws_env(proxy.endpoint), **FAST, "PORTQ_MAX_RETRIES": "4"}
    store = Store(s3_store)  # the test reads the server directly
    paths = slow_models(tmp_path / "models", 3)
    worker = WorkerProcess(queue_db, s3_store, "cpu", tmp_path / "w.log", env=through_proxy).wait_ready()
    try:
        res = run_cli(*submit_args(paths, "gone", seconds=3), env={**through_proxy, "PORTQ_BROKER_URL": queue_db,
                                                                    "PORTQ_STORE": s3_store})
        assert res.returncode == 0, res.stderr
        wait_for(lambda: any(r.status is JobStatus.running for r in batches.list_records(store, "gone")), 120,
                 "a running job")
        proxy.cut()  # mid-export: the job's next read or write, its publish, finds no store
        wait_for(lambda: "transient failure" in worker.output(), 120, "the worker to meet the outage")
        time.sleep(2)
        proxy.restore()
        recs = wait_for(lambda: (lambda rs: rs if len(rs) == 3 and all(r.status.finished for r in rs) else None)(
            batches.list_records(store, "gone")), 180, "every job to finish")
    finally:
        worker.stop()
        proxy.cut()
    log = worker.output()
    assert "transient failure" in log and "does not answer" in log, log
    assert [r.status for r in recs] == [JobStatus.succeeded] * 3, [r.error for r in recs]
    for r in recs:  # each result is whole and committed; an interrupted upload is uncommitted, swept later
        key = r.result.rsplit("/", 1)[0]
        assert store.committed(key) == r.result
        report = store.read_json(f"{r.result}/report.json")
        assert all(store.size(f"{r.result}/{a['path']}") == a["size_bytes"] for a in report["artifacts"])
        markers = {json.loads(store.read_bytes(f"{STAGING}/{m}"))["folder"] for m in store.list(STAGING)}
        assert set(store.list(key)) - {COMMIT, r.result.rsplit("/", 1)[1]} <= {f.rsplit("/", 1)[1] for f in markers}
