"""Across the real queue: a real Redis database, real `portq worker` processes, the real CLI."""

import json
import time

import onnxruntime as ort
import pytest
import redis
from portq.tasks.core.settings import redact_url

from tests.conftest import run_cli

pytestmark = pytest.mark.queue


def cli_env(broker, store_dir):
    return {"PORTQ_BROKER_URL": broker, "PORTQ_STORE": str(store_dir)}


def report(env, batch):
    res = run_cli("report", batch, "--json", env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_submit_wait_through_redis_and_a_worker(example_models, start_worker, queue_db, store_dir):
    worker = start_worker("cpu")
    env = cli_env(queue_db, store_dir)
    res = run_cli("submit", *map(str, example_models.values()), "--batch", "q", "--wait", "--timeout", "240",
                  env=env)
    assert res.returncode == 0, res.stderr + worker.output()
    assert f"queued 3 job(s) on {redact_url(queue_db)}; store: {store_dir}" in res.stderr
    for model, path in example_models.items():  # each result as it finished, then where the reports are
        assert f"✓ {model} ({path}): succeeded" in res.stderr
    assert f"reports: summary page {store_dir}/batches/q/summary.html" in res.stderr
    doc = report(env, "q")
    assert doc["counts"]["succeeded"] == 3
    for job in doc["jobs"]:
        (art,) = job["artifacts"]
        assert art["parity"]["passed"] and art["latency"]["p50_ms"] > 0 and art["latency"]["source_p50_ms"] > 0
        ort.InferenceSession(f"{job['result']}/{art['path']}", providers=["CPUExecutionProvider"])  # loads
        assert f"Task portq.convert[{job['job_id']}] received" in worker.output()
    assert "pool process warm in" in worker.output()  # the pool process warmed up once forked (portq.worker.warm)


def test_cuda_jobs_go_to_the_gpu_queue_and_fail_without_cuda(example_models, start_worker, queue_db, store_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = cli_env(queue_db, store_dir)
    res = run_cli("submit", str(example_models["mlp"]), "--target", "cuda", "--batch", "g", env=env)
    assert res.returncode == 0, res.stderr
    r = redis.Redis.from_url(queue_db)
    assert (r.llen("gpu"), r.llen("cpu")) == (1, 0)
    start_worker("cpu")  # a cpu worker must not take it
    time.sleep(2)
    assert r.llen("gpu") == 1
    gpu_worker = start_worker("gpu", env={"PORTQ_GPUS": "0"})
    follow = run_cli("submit", str(example_models["textcls"]), "--target", "cuda", "--batch", "g", "--wait",
                     "--timeout", "120", env=env)
    assert follow.returncode == 1
    for job in report(env, "g")["jobs"]:
        assert job["status"] == "failed" and "no CUDA device" in job["error"] and job["artifacts"] == []
    assert gpu_worker.proc.poll() is None  # still serving


def test_bad_files_fail_alone_and_the_worker_carries_on(example_models, start_worker, queue_db, store_dir, tmp_path):
    worker = start_worker("cpu")
    env = cli_env(queue_db, store_dir)
    (tmp_path / "text.pt").write_text("just text")
    good = example_models["mlp"].read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 3])
    res = run_cli("submit", str(tmp_path / "text.pt"), str(tmp_path / "truncated.pt"),
                  str(example_models["mlp"]), "--batch", "bad", "--wait", "--timeout", "120", env=env)
    assert res.returncode == 1
    jobs = {j["model"]: j for j in report(env, "bad")["jobs"]}
    assert jobs["mlp"]["status"] == "succeeded"
    assert "not a PyTorch model file" in jobs["text"]["error"] and "text.pt" in jobs["text"]["error"]
    assert "truncated or corrupt" in jobs["truncated"]["error"]
    assert worker.proc.poll() is None


def test_a_pickled_message_is_rejected_unrun(example_models, start_worker, queue_db, store_dir, tmp_path):
    from kombu import Connection

    marker = tmp_path / "pickle-ran"
    worker = start_worker("cpu")

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    with Connection(queue_db) as conn:
        producer = conn.Producer(serializer="pickle")
        producer.publish(
            {"spec": Payload()}, routing_key="cpu", exchange="",
            headers={"task": "portq.convert", "id": "evil-1", "lang": "py", "argsrepr": "", "kwargsrepr": ""},
        )
    env = cli_env(queue_db, store_dir)
    res = run_cli("submit", str(example_models["mlp"]), "--batch", "after", "--wait", "--timeout", "120", env=env)
    assert res.returncode == 0, res.stderr
    assert not marker.exists()
    assert "ContentDisallowed" in worker.output() or "Refusing to deserialize" in worker.output()


def test_optimize_through_redis_and_a_worker(example_models, start_worker, queue_db, store_dir):
    """--optimize on the queue: the candidates run in the worker's isolated steps, and the report ranks them."""
    worker = start_worker("cpu")
    env = cli_env(queue_db, store_dir)
    res = run_cli("submit", str(example_models["convnet"]), "--batch", "opt", "--optimize", "ort-all,int8-dynamic",
                  "--precision", "int8", "--runs", "6", "--wait", "--timeout", "300", env=env)
    assert res.returncode == 0, res.stderr + worker.output()
    (job,) = report(env, "opt")["jobs"]
    arts = {a["id"]: a for a in job["artifacts"]}
    assert set(arts) == {"onnx", "onnx.ort-all", "onnx.int8-dynamic"}
    for name in ("onnx.ort-all", "onnx.int8-dynamic"):
        assert arts[name]["status"] == "succeeded" and arts[name]["parity"]["passed"], arts[name]["error"]
        assert arts[name]["optimization"]["base"] == "onnx" and arts[name]["requested_by"] == "optimize"
    assert arts["onnx.int8-dynamic"]["parity"]["precision"] == "int8"
    assert job["best"] in arts and arts[job["best"]]["best"]


def test_fuse_through_redis_and_a_worker(start_worker, queue_db, store_dir, tmp_path):
    import torch

    from tests.tasks.fusion.helpers import SmallNet, fine_tunes, save_data, save_scripts

    worker = start_worker("cpu")
    env = cli_env(queue_db, store_dir)
    torch.manual_seed(0)
    paths = save_scripts(tmp_path / "m", fine_tunes(SmallNet().eval(), 3), torch.randn(6, 4))
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    eval_data = save_data(tmp_path / "eval.npz", x, torch.randint(0, 3, (32,)))
    res = run_cli("fuse", *paths, "--method", "greedy-soup", "--eval-data", eval_data, "--input", "x:float32[4,4]",
                  "--runs", "3", "--batch", "fq", "--wait", "--timeout", "240", env=env)
    assert res.returncode == 0, res.stderr + worker.output()
    assert f"queued 1 job(s) on {redact_url(queue_db)}" in res.stderr
    (job,) = report(env, "fq")["jobs"]
    assert job["kind"] == "fuse" and job["source"] == "fuse(greedy-soup: ts0.pt, ts1.pt, ts2.pt)"
    assert job["artifacts"][0]["parity"]["passed"]
    assert f"Task portq.convert[{job['job_id']}] received" in worker.output()
    fusion = json.loads(open(job["report"]).read())["fusion"]
    assert fusion["greedy_steps"] and fusion["members"][0]["kept"] is not None and fusion["soup_score"] is not None
