"""Delivery under failure, across real Redis servers and real worker processes: nothing lost, nothing doubled.

Workers here run with a short time limit and visibility timeout (40 s / 50 s), so a message held by a
worker that was killed is redelivered within a minute instead of hours. The job limit also covers the
forkserver's start in a fresh worker process and a busy machine's slow exports: tests that count attempts
must not see a job fail on time instead.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from portq.tasks.core.contract import JobStatus
from portq.tasks.state import records as batches
from portq.tasks.state.store import Store

from tests.conftest import WorkerProcess, run_cli
from tests.hostile import ARCH, write_state_dict
from tests.redis_server import RedisServer

pytestmark = pytest.mark.queue

ROOT = Path(__file__).resolve().parents[2]
FAST = {"PORTQ_TASK_TIME_LIMIT": "40", "PORTQ_VISIBILITY_TIMEOUT": "50", "PYTHONPATH": str(ROOT)}


def slow_models(directory: Path, n: int) -> list[Path]:
    """n different models (different weights, so different job keys) whose export takes a while."""
    directory.mkdir(parents=True, exist_ok=True)
    return [write_state_dict(directory / f"slow{i}.pt", seed=i) for i in range(n)]


def submit_args(paths, batch, seconds):
    return ["submit", *map(str, paths), "--batch", batch, "--format", "pt2", "--runs", "2",
            "--arch", f"{ARCH}:SlowExport", "--arch-kwargs", json.dumps({"seconds": seconds})]


def env_for(broker, store):
    return {"PORTQ_BROKER_URL": broker, "PORTQ_STORE": str(store), **FAST}


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def records(store_dir, batch):
    return batches.list_records(Store(str(store_dir)), batch)


def all_finished(store_dir, batch, n):
    recs = records(store_dir, batch)
    return recs if len(recs) == n and all(r.status.finished for r in recs) else None


def successes(*logs):
    """How often each job id was reported succeeded, over the given worker logs."""
    text = "".join(w.output() for w in logs)
    return Counter(re.findall(r"job (j[0-9a-f]+) \([^)]*\): succeeded", text))


def logged(workers, n):
    """Wait until the workers have logged n successes (a record is written just before its log line)."""
    wait_for(lambda: sum(successes(*workers).values()) >= n, 30, f"{n} successes in the worker logs")


def assert_results_whole(store_dir, recs):
    """One complete result folder per job, nothing else under results/."""
    results = store_dir / "results"
    folders = sorted(p.name for p in results.iterdir())
    assert sorted(Path(r.result).name for r in recs) == folders
    for r in recs:
        report = json.loads((store_dir / r.result / "report.json").read_text())
        assert report["status"] == "succeeded"
        for art in report["artifacts"]:
            path = Path(report["result"]) / art["path"]
            assert path.is_file() and path.stat().st_size == art["size_bytes"]


def test_kill_9_a_worker_mid_batch_every_job_succeeds_once(tmp_path, queue_db, store_dir):
    paths = slow_models(tmp_path / "models", 6)
    env = env_for(queue_db, store_dir)
    a = WorkerProcess(queue_db, store_dir, "cpu", tmp_path / "a.log", env=FAST).wait_ready()
    b = WorkerProcess(queue_db, store_dir, "cpu", tmp_path / "b.log", env=FAST).wait_ready()
    try:
        res = run_cli(*submit_args(paths, "k9", seconds=2), env=env)
        assert res.returncode == 0, res.stderr
        a_host = a.name.split("@")[0]
        victim = wait_for(lambda: next((r for r in records(store_dir, "k9") if r.status is JobStatus.running
                                        and (r.worker or "").startswith(a_host)), None), 120, "a job running on A")
        time.sleep(1.0)  # inside the export now
        os.killpg(a.proc.pid, signal.SIGKILL)  # the worker, its pool process and the step's process, all at once
        a.proc.wait(10)
        recs = wait_for(lambda: all_finished(store_dir, "k9", 6), 180, "every job to finish")
        logged([a, b], 6)
    finally:
        b.stop()
        a.stop()
    assert [r.status for r in recs] == [JobStatus.succeeded] * 6, [r.error for r in recs]
    by_id = {r.job_id: r for r in recs}
    assert by_id[victim.job_id].attempts == 2 and by_id[victim.job_id].worker.startswith(b.name.split("@")[0])
    assert sum(r.attempts for r in recs) == 7  # the killed attempt, then one per job
    assert successes(a, b) == Counter({r.job_id: 1 for r in recs})
    assert_results_whole(store_dir, recs)


def test_restart_redis_mid_batch_nothing_is_lost(tmp_path, store_dir):
    server = RedisServer(tmp_path / "redis").start()
    broker = server.url()
    paths = slow_models(tmp_path / "models", 6)
    env = env_for(broker, store_dir)
    worker = WorkerProcess(broker, store_dir, "cpu", tmp_path / "w.log", env=FAST).wait_ready()
    waiter = None
    try:
        # the client follows the batch with --wait: it reads the store, so the broker going away does not stop it
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")} | env
        waiter = subprocess.Popen([sys.executable, "-m", "portq.client", *submit_args(paths, "rr", seconds=1),
                                   "--wait", "--timeout", "240"], env=full_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        wait_for(lambda: sum(r.status is JobStatus.succeeded for r in records(store_dir, "rr")) >= 2, 120,
                 "two jobs done")
        server.kill()  # mid-batch: one job running, the others queued
        waiter.kill()  # ... and the client goes too
        waiter.wait(10)
        time.sleep(3)
        server.start()
        # a new client picks the batch up where the old one left it
        follow = run_cli("wait", "rr", "--timeout", "240", env=env, timeout=300)
        assert follow.returncode == 0, follow.stderr + worker.output()
        assert "rr" in follow.stdout
        recs = all_finished(store_dir, "rr", 6)
        logged([worker], 6)
        status = run_cli("status", "rr", env=env)
    finally:
        if waiter and waiter.poll() is None:
            waiter.kill()
        worker.stop()
        server.stop()
    assert [r.status for r in recs] == [JobStatus.succeeded] * 6, [r.error for r in recs]
    assert successes(worker) == Counter({r.job_id: 1 for r in recs})
    assert_results_whole(store_dir, recs)
    assert status.returncode == 0 and "succeeded 6" in status.stdout
    assert "Connection to broker lost" in worker.output() or "Cannot connect" in worker.output()


def test_a_job_that_keeps_killing_its_worker_is_dead_lettered_then_retried(tmp_path, queue_db, store_dir):
    """The source segfaults on every run until it is "fixed". Jobs run in the pool process (PORTQ_ISOLATE=0), so
    each attempt kills it; under step isolation the same crash costs the job's step process and fails the job at
    once (tests/tasks/execution/test_isolation.py)."""
    marker = tmp_path / "fixed"
    model = write_state_dict(tmp_path / "crasher.pt")
    env = env_for(queue_db, store_dir)
    worker = WorkerProcess(queue_db, store_dir, "cpu", tmp_path / "w.log",
                           env={**FAST, "PORTQ_MAX_RETRIES": "2", "PORTQ_ISOLATE": "0"})
    worker.wait_ready()
    try:
        res = run_cli("submit", str(model), "--batch", "dl", "--arch", f"{ARCH}:CrashUnless", "--arch-kwargs",
                      json.dumps({"marker": str(marker)}), "--wait", "--timeout", "180", env=env)
        assert res.returncode == 1, res.stderr + worker.output()
        (rec,) = records(store_dir, "dl")
        assert rec.status is JobStatus.failed and rec.attempts == 3 and rec.dead_letter
        assert "the worker process died on each of its 3 attempts" in rec.error
        assert "SIGSEGV" in rec.error and "portq retry dl" in rec.error
        assert worker.output().count("exited with 'signal 11 (SIGSEGV)'") == 3  # three attempts, no more
        assert worker.proc.poll() is None  # the worker itself carried on
        dead = json.loads((store_dir / rec.dead_letter).read_text())
        assert dead["spec"]["job_id"] == rec.job_id and dead["attempts"] == 3

        marker.touch()  # "fix" the model, then resubmit the dead letter
        again = run_cli("retry", "dl", "--wait", "--timeout", "180", env=env)
        assert again.returncode == 0, again.stdout + again.stderr + worker.output()
        assert "resubmitted 1 job(s): crasher" in again.stdout
        (rec,) = records(store_dir, "dl")
        assert rec.status is JobStatus.succeeded and rec.attempts == 1 and rec.dead_letter is None
        assert not (store_dir / "batches/dl/dead").exists() or not list((store_dir / "batches/dl/dead").iterdir())
    finally:
        worker.stop()


def test_sigterm_finishes_the_running_job_and_leaves_the_queue_for_others(tmp_path, queue_db, store_dir):
    paths = slow_models(tmp_path / "models", 3)
    env = env_for(queue_db, store_dir)
    a = WorkerProcess(queue_db, store_dir, "cpu", tmp_path / "a.log", env=FAST).wait_ready()
    b = None
    try:
        assert run_cli(*submit_args(paths, "warm", seconds=3), env=env).returncode == 0
        running = wait_for(lambda: next((r for r in records(store_dir, "warm") if r.status is JobStatus.running),
                                        None), 120, "a running job")
        os.kill(a.proc.pid, signal.SIGTERM)  # warm shutdown, as `docker stop` sends it
        assert a.proc.wait(60) == 0
        assert "Warm shutdown" in a.output() or "warm shutdown" in a.output()
        done = {r.job_id: r for r in records(store_dir, "warm")}
        assert done[running.job_id].status is JobStatus.succeeded and done[running.job_id].attempts == 1
        assert sum(r.status is JobStatus.queued for r in done.values()) == 2  # untouched, still on the queue
        b = WorkerProcess(queue_db, store_dir, "cpu", tmp_path / "b.log", env=FAST).wait_ready()
        recs = wait_for(lambda: all_finished(store_dir, "warm", 3), 120, "the rest to finish on B")
        logged([a, b], 3)
    finally:
        a.stop()
        if b:
            b.stop()
    assert [r.status for r in recs] == [JobStatus.succeeded] * 3
    assert successes(a) == Counter({running.job_id: 1})
    assert successes(a, b) == Counter({r.job_id: 1 for r in recs})


def test_cancel_stops_queued_jobs_and_workers_shows_what_runs(tmp_path, queue_db, store_dir):
    paths = slow_models(tmp_path / "models", 4)
    # No redelivery is needed here: limits roomy enough that a 10 s export finishes on a busy machine too
    # (the first isolated step of a worker process also starts its forkserver).
    roomy = {**FAST, "PORTQ_TASK_TIME_LIMIT": "90", "PORTQ_VISIBILITY_TIMEOUT": "120"}
    env = {**env_for(queue_db, store_dir), **roomy}
    worker = WorkerProcess(queue_db, store_dir, "cpu", tmp_path / "w.log", env=roomy).wait_ready()
    try:
        assert run_cli(*submit_args(paths, "cx", seconds=10), env=env).returncode == 0
        running = wait_for(lambda: next((r for r in records(store_dir, "cx") if r.status is JobStatus.running),
                                        None), 120, "a running job")
        shown = run_cli("workers", "--json", env=env)
        assert shown.returncode == 0, shown.stderr
        (w,) = json.loads(shown.stdout)["workers"]
        assert w["worker"] == worker.name.replace("%h", w["worker"].split("@")[1]) and w["queues"] == ["cpu"]
        assert [j["job_id"] for j in w["running"]] == [running.job_id] and w["running"][0]["model"] == running.model

        res = run_cli("cancel", "cx", env=env)
        assert res.returncode == 0 and "cancelled 3 queued job(s)" in res.stdout
        assert "1 running job(s) will finish" in res.stderr
        recs = wait_for(lambda: all_finished(store_dir, "cx", 4), 120, "the batch to settle")
        states = Counter(r.status for r in recs)
        assert states == Counter({JobStatus.succeeded: 1, JobStatus.cancelled: 3})
        assert {r.job_id for r in recs if r.status is JobStatus.succeeded} == {running.job_id}
        time.sleep(2)  # the cancelled messages reach the worker and are dropped unrun
        assert successes(worker) == Counter({running.job_id: 1})
        assert len(list((store_dir / "results").iterdir())) == 1

        # --terminate: the running job's process is killed; the worker carries on with the next job
        long = write_state_dict(tmp_path / "models/long.pt", seed=99)
        assert run_cli(*submit_args([long], "cy", seconds=600), env=env).returncode == 0
        wait_for(lambda: any(r.status is JobStatus.running for r in records(store_dir, "cy")), 120, "it to run")
        time.sleep(1)
        res = run_cli("cancel", "cy", "--terminate", env=env)
        assert res.returncode == 0 and "and 1 running job(s)" in res.stdout, res.stdout + res.stderr
        (rec,) = wait_for(lambda: all_finished(store_dir, "cy", 1), 60, "the cancelled job")
        assert rec.status is JobStatus.cancelled
        after = run_cli("submit", str(paths[0]), "--batch", "cz", "--format", "pt2", "--force", "--runs", "2",
                        "--arch", f"{ARCH}:SlowExport", "--arch-kwargs", '{"seconds": 0}', "--wait",
                        "--timeout", "120", env=env)
        assert after.returncode == 0, after.stderr + worker.output()
    finally:
        worker.stop()
