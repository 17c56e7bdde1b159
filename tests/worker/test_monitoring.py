"""Flower against portq's app: its Prometheus /metrics counts jobs by state, with their run times."""

import re
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import run_cli
from tests.redis_server import free_port

pytestmark = pytest.mark.queue


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{([^}}]*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_flower_metrics_count_jobs_by_state(example_models, tmp_path, start_worker, queue_db, store_dir):
    pytest.importorskip("flower")
    import os

    port = free_port()
    env = {**os.environ, "PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": str(store_dir)}
    log = open(tmp_path / "flower.log", "w")
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "portq.worker.app", "flower",
                               f"--port={port}", "--address=127.0.0.1"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                scrape(port)
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
                time.sleep(0.3)
        start_worker("cpu")
        (tmp_path / "notes.pt").write_text("not a model")
        res = run_cli("submit", str(example_models["mlp"]), str(tmp_path / "notes.pt"), "--batch", "flw", "--wait",
                      "--timeout", "120", env={"PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": str(store_dir)})
        assert res.returncode == 1
        deadline = time.monotonic() + 30
        while True:
            text = scrape(port)
            if metric(text, "flower_events_total", type="task-failed", task="portq.convert") >= 1 and \
                    metric(text, "flower_events_total", type="task-succeeded", task="portq.convert") >= 1:
                break
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(0.5)
    finally:
        flower.terminate()
        flower.wait(20)
        log.close()
    assert metric(text, "flower_events_total", type="task-sent", task="portq.convert") == 2  # queued, by the client
    assert metric(text, "flower_events_total", type="task-received", task="portq.convert") == 2
    assert metric(text, "flower_events_total", type="task-succeeded", task="portq.convert") == 1
    assert metric(text, "flower_events_total", type="task-failed", task="portq.convert") == 1  # a failed conversion
    assert metric(text, "flower_task_runtime_seconds_count", task="portq.convert") == 1
    assert metric(text, "flower_task_runtime_seconds_sum", task="portq.convert") > 0
