"""One batch full of trouble through a real worker: each bad job ends as a clear failure, the rest complete."""

import json
import os
from pathlib import Path

import pytest
from kombu import Connection
from portq.tasks.core.contract import JobStatus
from portq.tasks.state import records as batches
from portq.tasks.state.store import Store

from tests.conftest import WorkerProcess, run_cli
from tests.hostile import ARCH, write_malicious_pickle, write_state_dict

pytestmark = pytest.mark.queue

ROOT = Path(__file__).resolve().parents[2]
# the step limit leaves room for a good model's export on a busy machine; the job limit for its few steps and for
# the wait on a fresh pool's warm-up (two pool processes warming their step forkservers at once on 2 cores: 25 s)
LIMITS = {"PORTQ_TASK_TIME_LIMIT": "60", "PORTQ_VISIBILITY_TIMEOUT": "75", "PORTQ_STEP_TIME_LIMIT": "10",
          "PYTHONPATH": str(ROOT)}


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_batch_of_hostile_jobs(example_models, tmp_path, queue_db, store_dir):
    env = {"PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": str(store_dir), **LIMITS}
    worker = WorkerProcess(queue_db, store_dir, "cpu", tmp_path / "w.log", concurrency=2, env=LIMITS).wait_ready()
    pickle_ran = tmp_path / "pickle-ran"
    message_ran = tmp_path / "message-ran"
    models = tmp_path / "m"
    models.mkdir()
    try:
        def submit(*args):
            res = run_cli("submit", *map(str, args), "--batch", "hostile", env=env)
            assert res.returncode == 0, res.stderr
            return res

        submit(write_state_dict(models / "sleeper.pt", 1), "--arch", f"{ARCH}:Sleeper")  # outlasts the job limit
        submit(write_state_dict(models / "crasher.pt", 2), "--arch", f"{ARCH}:CrashOnExport", "-f", "pt2",
               "-f", "torchscript")
        submit(write_state_dict(models / "hanger.pt", 3), "--arch", f"{ARCH}:HangOnExport", "-f", "pt2")
        submit(write_malicious_pickle(models / "evil.pt", pickle_ran))
        # a path with `..` in it: the job is named after the file's stem, so nothing can land outside the store
        (models / "d1" / "d2").mkdir(parents=True)
        (models / "x.pt").write_bytes(example_models["mlp"].read_bytes())
        (models / "x.npz").write_bytes(example_models["mlp"].with_suffix(".npz").read_bytes())
        submit(f"{models}/d1/d2/../../x.pt")
        # messages straight onto the queue: a pickled one, and a JSON job whose names try to leave the store
        with Connection(queue_db) as conn:
            conn.Producer(serializer="pickle").publish(
                {"spec": Payload(message_ran)}, routing_key="cpu", exchange="",
                headers={"task": "portq.convert", "id": "evil-pickle", "lang": "py", "argsrepr": "", "kwargsrepr": ""})
            spec = {"version": 2, "job_id": "jtraversal01", "batch_id": "hostile", "model": "../../escaped",
                    "kind": "convert",
                    "source": {"kind": "convert", "model": {"key": "inputs/../../../escaped.pt",
                                                            "name": "../../escaped.pt", "sha256": "0" * 64, "size": 1}}}
            headers = {"task": "portq.convert", "lang": "py", "argsrepr": "", "kwargsrepr": ""}
            conn.Producer(serializer="json").publish(  # Celery's message body: [args, kwargs, embed]
                [[], {"spec": spec}, {}], routing_key="cpu", exchange="", headers={**headers, "id": "evil-json"})
            # and a body that is not Celery's shape at all (the stock handler dies on it, stopping the worker)
            conn.Producer(serializer="json").publish(
                {"spec": spec}, routing_key="cpu", exchange="", headers={**headers, "id": "malformed"})
        res = run_cli("submit", str(example_models["mlp"]), str(example_models["convnet"]), "--batch", "hostile",
                      "--wait", "--timeout", "240", env=env)
        assert res.returncode == 1, res.stderr + worker.output()
        doc = json.loads(run_cli("report", "hostile", "--json", env=env).stdout)
        assert worker.proc.poll() is None  # the worker lived through all of it
    finally:
        worker.stop()

    jobs = {j["model"]: j for j in doc["jobs"]}
    assert set(jobs) == {"sleeper", "crasher", "hanger", "evil", "x", "mlp", "convnet", "escaped"}
    from portq.tasks.checks.threads import usable_cores

    share = max(1, usable_cores() // 2)  # a pool of two processes: each computes on its share of the cores
    for good in ("mlp", "convnet", "x"):
        assert jobs[good]["status"] == "succeeded", jobs[good]["error"]
        threads = json.loads((Path(jobs[good]["result"]) / "report.json").read_text())["environment"]["threads"]
        assert threads["torch_intra_op"] == share and threads["onnxruntime_intra_op"] == share, threads
    assert doc["counts"] == {"queued": 0, "running": 0, "succeeded": 3, "failed": 5, "cancelled": 0, "total": 8}

    # a source that never returns is stopped at the step limit too: it runs in the job's step process (the job
    # time limit's own kill, of a pool process running a job in-process, is tests/worker/test_delivery.py's)
    sleeper = jobs["sleeper"]["error"]
    assert "step source" in sleeper and "did not finish within its time limit of 10s" in sleeper, sleeper
    assert "sleeper.pt" in sleeper and jobs["sleeper"]["artifacts"] == []

    # a segfault inside one format's export costs that format only
    crasher = {a["id"]: a for a in jobs["crasher"]["artifacts"]}
    assert "step export:pt2" in crasher["pt2"]["error"] and "crashed with SIGSEGV" in crasher["pt2"]["error"]
    assert crasher["torchscript"]["status"] == "succeeded"
    assert (Path(jobs["crasher"]["result"]) / crasher["torchscript"]["path"]).is_file()

    # a hung export is stopped at the step limit
    (hang,) = jobs["hanger"]["artifacts"]
    assert "step export:pt2" in hang["error"] and "did not finish within its time limit of 10s" in hang["error"]

    # a pickle that would run code on load is refused without running it
    assert "refused unread" in jobs["evil"]["error"] and "--trust-pickle" in jobs["evil"]["error"]
    assert not pickle_ran.exists()

    # a pickled message is refused by the worker before any task code runs
    assert not message_ran.exists()
    assert "ContentDisallowed" in worker.output() or "Refusing to deserialize" in worker.output()

    assert "malformed portq.convert message" in worker.output() and "Unrecoverable error" not in worker.output()

    # a JSON job whose names climb out of the store is refused, and says so in the batch
    assert "refused this job's message" in jobs["escaped"]["error"]
    assert "not a safe path component" in jobs["escaped"]["error"]
    for name in ("escaped", "escaped.pt"):
        assert not (store_dir.parent / name).exists() and not (store_dir.parent.parent / name).exists()
    # everything the batch wrote is inside the store
    store = Store(str(store_dir))
    assert {r.model for r in batches.list_records(store, "hostile") if r.status is JobStatus.succeeded} == \
        {"mlp", "convnet", "x"}
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and store_dir not in p.parents
               and p.parent not in (models, models / "d1", models / "d1" / "d2") and p.suffix != ".log"]
    assert outside == []


def test_a_batch_name_that_climbs_out_of_the_store_is_refused(example_models, tmp_path, store_dir):
    res = run_cli("submit", str(example_models["mlp"]), "--batch", "../../outside",
                  env={"PORTQ_STORE": str(store_dir)})
    assert res.returncode == 2 and "not a valid id" in res.stderr
    assert not (tmp_path / "outside").exists() and not (store_dir.parent.parent / "outside").exists()
