"""The CLI on an S3 store (moto's server on the loopback), embedded mode with step isolation on: an ONNX artifact
with external data stored and reproduced as one artifact, and the store problems a user is told about at once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.redis_server import free_port
from tests.s3_server import SECRET, isolated_aws_env

REPO = Path(__file__).resolve().parents[2]


def test_an_onnx_artifact_with_external_data_is_stored_and_reproduced_as_one(example_models, s3_store, s3_env,
                                                                             tmp_path):
    from portq.tasks.state.store import Store

    env = {**s3_env, "PORTQ_STORE": s3_store}
    res = run_cli("submit", str(example_models["mlp"]), "--batch", "ext", "--format", "onnx.external",
                  "--runs", "2", "--warmup", "1", env=env)
    assert res.returncode == 0, res.stderr
    (job,) = json.loads(run_cli("report", "ext", "--json", env=env).stdout)["jobs"]
    (art,) = job["artifacts"]
    assert (art["id"], art["path"], art["data"]) == ("onnx.external", "onnx.external/model.onnx",
                                                     ["onnx.external/model.onnx.data"])
    store = Store(s3_store)
    folder = job["result"][len(s3_store) + 1:]
    sizes = {p.rsplit("/", 1)[-1]: store.size(f"{folder}/{p}") for p in (art["path"], *art["data"])}
    assert art["size_bytes"] == sum(sizes.values()) and sizes["model.onnx.data"] > sizes["model.onnx"]
    assert art["parity"]["passed"] and art["latency"]["p50_ms"] > 0

    # the result folder, downloaded as a user would, reproduces the artifact without portq
    local = tmp_path / "result"
    store.fs.get(f"{store.base}/{folder}/", str(local), recursive=True)
    source = next(p for p in store.list("inputs") if p.endswith(".pt"))
    with store.local_file(f"inputs/{source}") as model:
        script_env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTQ_", "AWS_"))}
        ran = subprocess.run([sys.executable, str(local / art["reproduce"]), "--model", str(model)],
                             capture_output=True, text=True, env=script_env, timeout=300, cwd="/")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "parity passed" in ran.stdout
    assert (local / "onnx.external/reproduced_model.onnx.data").exists()


def test_an_unknown_store_scheme_is_refused_at_submit(example_models):
    res = run_cli("submit", str(example_models["mlp"]), env={"PORTQ_STORE": "nosuch://bucket/portq"})
    assert res.returncode == 2
    assert "cannot open store nosuch://bucket/portq: Protocol not known: nosuch" in res.stderr


def test_an_unreachable_endpoint_is_named_at_submit_and_at_worker_start(example_models, s3_server, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**isolated_aws_env(endpoint), "PORTQ_STORE": "s3://bucket/portq"}
    res = run_cli("submit", str(example_models["mlp"]), env=env)
    assert res.returncode == 1, res.stderr
    assert f"the store's endpoint {endpoint} does not answer" in res.stderr and "s3://bucket/portq/" in res.stderr
    worker = run_cli("worker", "--queue", "cpu", env={**env, "PORTQ_BROKER_URL": "redis://127.0.0.1:6379/15"},
                     timeout=120)
    assert worker.returncode == 69, worker.stdout + worker.stderr
    said = worker.stdout + worker.stderr
    assert "refusing to start" in said and f"the store's endpoint {endpoint} does not answer" in said
    assert SECRET not in res.stderr + said


def test_a_missing_bucket_is_named_at_submit(example_models, s3_server, s3_env):
    res = run_cli("submit", str(example_models["mlp"]), env={**s3_env, "PORTQ_STORE": "s3://no-such-bucket/p"})
    assert res.returncode == 1
    assert "The specified bucket does not exist" in res.stderr and "create the bucket" in res.stderr


@pytest.mark.parametrize("missing", [("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")])
def test_missing_credentials_are_named_at_submit(example_models, s3_store, s3_env, missing):
    env = {k: v for k, v in s3_env.items() if k not in missing} | {"PORTQ_STORE": s3_store}
    res = subprocess.run([sys.executable, "-m", "portq.client", "submit", str(example_models["mlp"])],
                         capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith(("PORTQ_", "AWS_"))} | env)
    assert res.returncode == 1
    assert "no credentials for the object store" in res.stderr and "AWS_ACCESS_KEY_ID" in res.stderr


def test_a_failed_job_on_s3_is_retried_and_its_result_stays_whole(example_models, s3_store, s3_env):
    """A job that fails parity (atol = rtol = 0) publishes under failed/; `portq retry` removes that result and
    runs the job again, which publishes one whole folder of its own: nothing of the first attempt is left."""
    from portq.tasks.state import records as batches
    from portq.tasks.state.store import COMMIT, Store

    env = {**s3_env, "PORTQ_STORE": s3_store}
    args = ("--batch", "rt", "--atol", "0", "--rtol", "0", "--no-localise", "--runs", "2", "--warmup", "1")
    first = run_cli("submit", str(example_models["mlp"]), *args, env=env)
    assert first.returncode == 1, first.stderr
    store = Store(s3_store)
    (rec,) = batches.list_records(store, "rt")
    assert rec.status.value == "failed" and rec.result.startswith(f"failed/{rec.job_id}/d-")
    again = run_cli("retry", "rt", "--failed", env=env)
    assert again.returncode == 1 and "resubmitted 1 job(s): mlp" in again.stdout, again.stderr
    (after,) = batches.list_records(store, "rt")
    assert after.status.value == "failed" and after.attempts == 1 and after.result != rec.result
    key, folder = after.result.rsplit("/", 1)
    assert store.list(key) == sorted([COMMIT, folder]) and store.committed(key) == after.result
    assert store.read_json(f"{after.result}/report.json")["status"] == "failed"
