"""Credentials and trust, through a real Redis of our own (ACL user, password, TLS) and a real worker."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import WorkerProcess, run_cli
from tests.hostile import write_pickled_module
from tests.redis_server import RedisServer

pytestmark = pytest.mark.queue

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "ops-alice", "Tr0ub4dor-and-3"


def make_certs(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    d = directory
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=portq-test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "server.pem")
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


def test_acl_user_password_and_tls_work_and_are_never_shown(example_models, tmp_path, store_dir):
    certs = make_certs(tmp_path / "certs")
    server = RedisServer(tmp_path / "redis", "--user", "default", "off", "--user", USER, "on", f">{PASSWORD}", "~*",
                         "&*", "+@all", "--tls-cert-file", str(certs["cert"]), "--tls-key-file", str(certs["key"]),
                         "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no", tls=True).start()
    broker = (f"rediss://{USER}:{PASSWORD}@127.0.0.1:{server.port}/0"
              f"?ssl_cert_reqs=required&ssl_ca_certs={certs['ca']}")
    shown = f"rediss://***@127.0.0.1:{server.port}/0"
    env = {"PORTQ_BROKER_URL": broker, "PORTQ_STORE": str(store_dir)}
    worker = WorkerProcess(broker, store_dir, "cpu", tmp_path / "w.log", env={"PYTHONPATH": str(ROOT)})
    try:
        worker.wait_ready()
        res = run_cli("submit", str(example_models["mlp"]), "--batch", "tls", "--wait", "--timeout", "180", env=env)
        assert res.returncode == 0, res.stderr + worker.output()
        listed = run_cli("workers", env=env)
        assert listed.returncode == 0, listed.stderr
        wrong = run_cli("submit", str(example_models["mlp"]), "--batch", "nope",
                        env={**env, "PORTQ_BROKER_URL": broker.replace(PASSWORD, "not-the-Passw0rd")})
    finally:
        worker.stop()
        server.stop()
    everything = worker.output() + res.stdout + res.stderr + listed.stdout + listed.stderr + wrong.stdout + wrong.stderr
    assert PASSWORD not in everything and USER not in everything
    assert "not-the-Passw0rd" not in everything
    assert f"transport:   {shown}" in worker.output()  # Celery's banner, redacted
    assert f"queued 1 job(s) on {shown}" in res.stderr
    assert wrong.returncode == 2 and f"cannot reach the broker at {shown}" in wrong.stderr


def test_trust_pickle_is_opt_in_and_recorded(tmp_path, start_worker, queue_db, store_dir):
    # a whole pickled module (not a state dict): it needs full unpickling, which runs code from the file
    path = write_pickled_module(tmp_path / "whole.pt")
    start_worker("cpu", env={"PYTHONPATH": str(ROOT)})
    env = {"PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": str(store_dir)}
    refused = run_cli("submit", str(path), "--batch", "untrusted", "--wait", "--timeout", "120", env=env)
    assert refused.returncode == 1
    (job,) = json.loads(run_cli("report", "untrusted", "--json", env=env).stdout)["jobs"]
    assert "refused unread" in job["error"]
    trusted = run_cli("submit", str(path), "--batch", "trusted", "--trust-pickle", "--wait", "--timeout", "120",
                      env=env)
    (job,) = json.loads(run_cli("report", "trusted", "--json", env=env).stdout)["jobs"]
    report = json.loads(Path(job["report"]).read_text())
    assert report["trust_pickle"] is True, trusted.stderr


def test_size_limits_hold_on_the_worker_too(example_models, start_worker, queue_db, store_dir):
    """A client with looser limits (or any producer on the broker) cannot make a worker load a larger file."""
    start_worker("cpu", env={"PORTQ_MAX_MODEL_BYTES": "1000"})
    env = {"PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": str(store_dir)}
    res = run_cli("submit", str(example_models["mlp"]), "--batch", "big", "--wait", "--timeout", "120", env=env)
    assert res.returncode == 1
    (job,) = json.loads(run_cli("report", "big", "--json", env=env).stdout)["jobs"]
    size = example_models["mlp"].stat().st_size
    assert job["error"] == (f"[step receive, file {example_models['mlp']}] file is {size} bytes, over this worker's "
                            "limit of 1000 (PORTQ_MAX_MODEL_BYTES)")


def test_a_fuse_jobs_files_are_held_to_the_limits_of_their_kind(tmp_path):
    """Models against the model limit, data files (eval, calibration, fine-tune) against the sample limit."""
    import torch
    from portq.tasks.core.settings import Settings
    from portq.tasks.state.store import Store
    from portq.worker.task import _over_limits

    from tests.tasks.fusion.helpers import SmallNet, fuse_spec, save_data, save_state_dicts

    store = Store(str(tmp_path / "store"))
    paths = save_state_dicts(tmp_path / "m", [SmallNet(), SmallNet()])
    data = save_data(tmp_path / "eval.npz", torch.zeros(300, 4), torch.zeros(300, dtype=torch.long))
    spec = fuse_spec(store, paths, "soup", eval_data=data)
    big = max(Path(p).stat().st_size for p in paths)
    fits = Settings.resolve(env={"PORTQ_MAX_MODEL_BYTES": str(big), "PORTQ_MAX_SAMPLE_BYTES": "100000"})
    assert _over_limits(store, spec, fits) is None
    small = Settings.resolve(env={"PORTQ_MAX_MODEL_BYTES": str(big), "PORTQ_MAX_SAMPLE_BYTES": "1000"})
    size = Path(data).stat().st_size
    assert _over_limits(store, spec, small) == (f"[step receive, file {data}] file is {size} bytes, over this "
                                                "worker's limit of 1000 (PORTQ_MAX_SAMPLE_BYTES)")
