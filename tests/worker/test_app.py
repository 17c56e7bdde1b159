import subprocess
import sys

import pytest
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.settings import Settings
from portq.worker.app import limits_problem, make_app
from portq.worker.main import run_worker, worker_argv


def test_delivery_settings():
    app = make_app(Settings.resolve(env={}, broker_url="redis://127.0.0.1:6379/0", task_time_limit=100,
                                    visibility_timeout=200))
    conf = app.conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_time_limit == 100 < conf.broker_transport_options["visibility_timeout"] == 200
    assert conf.task_soft_time_limit is None  # a hard limit only; the main process records the kill
    assert conf.broker_transport_options["unacked_restore_interval"] == 10
    assert conf.broker_transport_options["unacked_restore_throttle"] == 1
    assert conf.broker_connection_max_retries is None
    assert "portq_settings" not in conf and app.portq_settings.task_time_limit == 100
    assert {q.name for q in conf.task_queues} == {"cpu", "gpu"}
    assert conf.worker_send_task_events
    assert "portq.convert" in app.tasks


def test_limits_that_would_run_jobs_twice_are_named():
    assert limits_problem(100, 200) is None
    assert "not below the visibility timeout" in limits_problem(300, 200)
    assert "no hard time limit" in limits_problem(None, 200)


def test_a_worker_refuses_to_start_when_its_time_limit_outlasts_the_visibility_timeout(tmp_path):
    """`celery ... worker --time-limit` overrides PORTQ_TASK_TIME_LIMIT; the check runs on what is in force."""
    import os

    env = {**os.environ, "PORTQ_BROKER_URL": "redis://:sup3rsecret@127.0.0.1:1/0", "PORTQ_STORE": str(tmp_path),
           "PORTQ_TASK_TIME_LIMIT": "100", "PORTQ_VISIBILITY_TIMEOUT": "200"}
    res = subprocess.run([sys.executable, "-m", "celery", "-A", "portq.worker.app", "worker", "--time-limit", "300",
                          "-Q", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 78
    assert "refusing to start: the hard time limit (300s) is not below the visibility timeout (200s)" in res.stderr
    assert "sup3rsecret" not in res.stdout + res.stderr


def test_a_worker_refuses_to_start_on_a_store_it_cannot_open(tmp_path):
    import os

    env = {**os.environ, "PORTQ_BROKER_URL": "redis://127.0.0.1:1/0", "PORTQ_STORE": "nosuch://user:s3cretpass@b/p"}
    res = subprocess.run([sys.executable, "-m", "celery", "-A", "portq.worker.app", "worker", "-Q", "cpu"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 78, res.stderr
    assert "refusing to start: [step store] cannot open store nosuch://***@b/p: Protocol not known" in res.stderr
    assert "s3cretpass" not in res.stdout + res.stderr


def test_worker_main_process_does_not_import_torch():
    code = ("import sys; import portq.worker.app, portq.worker.main, portq.worker.task, portq.tasks.execution.run, "
            "portq.tasks.state.delivery, portq.tasks.execution.isolation; "
            "print('torch' in sys.modules, 'typer' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_tasks_package_imports_neither_celery_nor_typer():
    code = ("import sys, pkgutil, importlib, portq.tasks as t; "
            "[importlib.import_module('portq.tasks.' + m.name) for m in pkgutil.walk_packages(t.__path__) "
            " if m.name != 'schema_files']; "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('celery', 'typer', 'kombu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_worker_refuses_to_start_without_broker():
    with pytest.raises(ConfigError, match="needs a broker"):
        run_worker(Settings.resolve(env={}), "cpu")


def test_gpu_worker_argv():
    argv = worker_argv("gpu", 4, "INFO", None)
    assert argv[:3] == ["worker", "-Q", "gpu"] and "prefork" in argv and argv[-2:] == ["--concurrency", "4"]
