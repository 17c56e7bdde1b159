"""A job's life at the edges, across the real queue: a worker on another store, a broker that is down."""

import json
import time

import pytest
import redis

from tests.conftest import run_cli
from tests.redis_server import RedisServer

pytestmark = pytest.mark.queue


def test_a_worker_on_another_store_fails_the_job_and_the_client_stops_waiting(example_models, start_worker,
                                                                               queue_db, store_dir, tmp_path):
    worker = start_worker("cpu")  # PORTQ_STORE=store_dir
    client_store = tmp_path / "client-store"
    env = {"PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": str(client_store)}
    started = time.monotonic()
    res = run_cli("submit", str(example_models["mlp"]), "--batch", "elsewhere", "--wait", "--timeout", "120",
                  env=env)
    assert time.monotonic() - started < 60, res.stderr
    assert res.returncode == 1, res.stderr + worker.output()
    doc = json.loads(run_cli("report", "elsewhere", "--json", env=env).stdout)
    (job,) = doc["jobs"]
    assert job["status"] == "failed"
    assert f"not in this worker's store {store_dir}" in job["error"]
    assert f"submitted to store {client_store}" in job["error"]


def test_a_dead_broker_leaves_jobs_not_sent_and_retry_sends_them(example_models, tmp_path):
    server = RedisServer(tmp_path / "redis")  # not started yet: nothing listens on its port
    env = {"PORTQ_BROKER_URL": server.url(), "PORTQ_STORE": str(tmp_path / "store")}
    res = run_cli("submit", str(example_models["mlp"]), "--batch", "down", env=env)
    assert res.returncode == 2, res.stderr
    assert "recorded as not sent" in res.stderr
    doc = json.loads(run_cli("report", "down", "--json", env=env).stdout)
    (job,) = doc["jobs"]
    assert job["status"] == "failed" and job["error"].startswith("not sent: the broker at"), job
    server.start()
    try:
        res = run_cli("retry", "down", env=env)
        assert res.returncode == 0, res.stderr
        assert "resubmitted 1 job(s)" in res.stdout
        assert redis.Redis.from_url(server.url()).llen("cpu") == 1  # the job's message, on its queue
        (job,) = json.loads(run_cli("report", "down", "--json", env=env).stdout)["jobs"]
        assert job["status"] == "queued"
    finally:
        server.stop()


def test_a_refusal_the_worker_cannot_write_to_the_client_store_reaches_it_through_the_broker(
        example_models, start_worker, queue_db, store_dir, tmp_path):
    """A message that does not say where the client's store is (an older client): the worker leaves its refusal on
    the broker, and the client's wait loop records it in its own store."""
    from portq.client.dispatch import producer
    from portq.tasks.core.contract import CONVERT_TASK
    from portq.tasks.core.settings import Settings
    from portq.tasks.state.store import Store

    from tests.jobs import prepare

    worker = start_worker("cpu")
    client_store = tmp_path / "client-store"
    (spec,) = prepare([str(example_models["mlp"])], Store(str(client_store)), batch="old", options={},
                      max_bytes=1 << 30).specs
    app = producer(Settings.resolve(broker_url=queue_db, store=str(client_store), env={}))
    app.send_task(CONVERT_TASK, kwargs={"spec": spec.model_dump(mode="json")}, queue=spec.queue, task_id=spec.job_id)
    env = {"PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": str(client_store)}
    started = time.monotonic()
    res = run_cli("wait", "old", "--timeout", "120", env=env)
    assert time.monotonic() - started < 60, res.stderr + worker.output()
    assert res.returncode == 1, res.stderr + worker.output()
    (job,) = json.loads(run_cli("report", "old", "--json", env=env).stdout)["jobs"]
    assert job["status"] == "failed"
    assert f"not in this worker's store {store_dir}" in job["error"] and "the client did not say which" in job["error"]
