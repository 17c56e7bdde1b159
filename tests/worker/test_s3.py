"""A store on an S3-compatible server (moto, on the loopback), through Redis and real worker processes with step
isolation on: nothing lost or doubled when a worker is killed, cached resubmits, reports and their links, and no
credential anywhere a user or an operator can read."""

import json
import os
import posixpath
import re
import signal
import time
from collections import Counter

import pytest
from portq.tasks.core.contract import JobStatus
from portq.tasks.state import records as batches
from portq.tasks.state.store import COMMIT, STAGING, Store

from tests.conftest import WorkerProcess, run_cli
from tests.s3_server import ACCESS_KEY, SECRET
from tests.worker.test_delivery import FAST, logged, slow_models, submit_args, successes, wait_for

pytestmark = pytest.mark.queue


def records(store: Store, batch: str):
    return batches.list_records(store, batch)


def all_finished(store: Store, batch: str, n: int):
    recs = records(store, batch)
    return recs if len(recs) == n and all(r.status.finished for r in recs) else None


def stored_text(store: Store) -> str:
    """Every text file in the store (reports, logs, records, scripts), concatenated."""
    paths = [p for p in store.fs.find(store.base) if not p.endswith((".pt", ".pt2", ".npz", ".onnx", ".data"))]
    return "\n".join(store.fs.cat_file(p).decode("utf-8", "replace") for p in paths)


def assert_one_whole_result_per_key(store: Store, recs) -> None:
    """Each job's record points at the committed folder of its key, which holds its report and artifacts; no
    other delivery folder, no leftover staging marker."""
    keys = sorted(store.list("results"))
    assert len(keys) == len({r.result.rsplit("/", 1)[0] for r in recs})
    for r in recs:
        key, folder = r.result.rsplit("/", 1)
        assert store.committed(key) == r.result
        assert store.list(key) == sorted([COMMIT, folder])  # one delivery's folder, nothing doubled
        report = store.read_json(f"{r.result}/report.json")
        assert report["status"] == "succeeded" and report["result"] == store.url(r.result)
        for art in report["artifacts"]:
            assert store.size(f"{r.result}/{art['path']}") == art["size_bytes"]
    assert store.list(STAGING) == []


def test_a_batch_on_s3_survives_a_killed_worker_and_resubmits_from_the_cache(tmp_path, queue_db, s3_store, s3_env):
    store = Store(s3_store)
    paths = slow_models(tmp_path / "models", 6)
    env = {**s3_env, **FAST, "PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": s3_store}
    a = WorkerProcess(queue_db, s3_store, "cpu", tmp_path / "a.log", env={**s3_env, **FAST}).wait_ready()
    b = WorkerProcess(queue_db, s3_store, "cpu", tmp_path / "b.log", env={**s3_env, **FAST}).wait_ready()
    try:
        res = run_cli(*submit_args(paths, "s3k9", seconds=2), env=env)
        assert res.returncode == 0, res.stderr
        a_host = a.name.split("@")[0]
        victim = wait_for(lambda: next((r for r in records(store, "s3k9") if r.status is JobStatus.running
                                        and (r.worker or "").startswith(a_host)), None), 120, "a job running on A")
        time.sleep(1.0)  # inside the isolated export step now
        os.killpg(a.proc.pid, signal.SIGKILL)  # the worker, its pool process and the step's process
        a.proc.wait(10)
        done = run_cli("wait", "s3k9", "--timeout", "240", env=env, timeout=300)
        assert done.returncode == 0, done.stderr + b.output()
        recs = all_finished(store, "s3k9", 6)
        logged([a, b], 6)
        first = successes(a, b)

        # the same models again: every job served from the stored results, nothing converted or written twice
        listing = sorted(store.fs.find(f"{store.base}/results"))
        again = run_cli(*submit_args(paths, "s3again", seconds=2), "--wait", "--timeout", "120", env=env)
        assert again.returncode == 0, again.stderr + b.output()
        cached = records(store, "s3again")
        status = run_cli("status", "s3again", env=env)
        report = run_cli("report", "s3again", "--json", env=env)
        page = run_cli("report", "s3k9", "--format", "html", "--to-store", env=env)
        local_page = run_cli("report", "s3k9", "--format", "html", "-o", str(tmp_path / "k9.html"), env=env)
    finally:
        b.stop()
        a.stop()
    assert [r.status for r in recs] == [JobStatus.succeeded] * 6, [r.error for r in recs]
    by_id = {r.job_id: r for r in recs}
    assert by_id[victim.job_id].attempts == 2 and by_id[victim.job_id].worker.startswith(b.name.split("@")[0])
    assert sum(r.attempts for r in recs) == 7  # the killed attempt, then one per job
    assert first == Counter({r.job_id: 1 for r in recs})
    assert_one_whole_result_per_key(store, recs)

    assert [(r.status, r.cached) for r in cached] == [(JobStatus.succeeded, True)] * 6
    assert sorted(r.result for r in cached) == sorted(r.result for r in recs)
    assert sorted(store.fs.find(f"{store.base}/results")) == listing
    assert status.returncode == 0 and "succeeded 6" in status.stdout
    doc = json.loads(report.stdout)
    assert doc["store"] == s3_store
    for job in doc["jobs"]:
        assert job["report"].startswith(f"{s3_store}/results/")
        assert job["result"] == job["report"][:-len("/report.json")]

    # the batch page in the store links each job's report.html relative to itself; a page written elsewhere
    # links the full URLs; never a path on the machine that wrote it
    assert page.returncode == 0 and page.stdout.strip() == f"{s3_store}/batches/s3k9/summary.html", page.stderr
    hrefs = re.findall(r'href="([^"]+)"', store.read_bytes("batches/s3k9/summary.html").decode())
    assert len(hrefs) == 6 and all(h.startswith("../../results/") and h.endswith("/report.html") for h in hrefs)
    assert all(store.exists(posixpath.normpath(f"batches/s3k9/{h}")) for h in hrefs)
    assert local_page.returncode == 0, local_page.stderr
    hrefs = re.findall(r'href="([^"]+)"', (tmp_path / "k9.html").read_text())
    assert len(hrefs) == 6 and all(h.startswith(f"{s3_store}/results/") for h in hrefs)

    # the credentials: nowhere in the workers' logs (banner included), the CLI's output or the store
    seen = "".join([a.output(), b.output(), res.stdout, res.stderr, done.stdout, done.stderr, again.stdout,
                    again.stderr, status.stdout, report.stdout, stored_text(store)])
    assert SECRET not in seen and ACCESS_KEY not in seen
    assert f"store {s3_store}" in a.output() or s3_store in a.output()
