import subprocess
import sys

import pytest
from portq.tasks.errors import ConfigError
from portq.tasks.settings import Settings
from portq.worker.app import make_app
from portq.worker.main import run_worker, worker_argv


def test_delivery_settings():
    app = make_app(Settings.resolve(env={}, broker_url="redis://127.0.0.1:6379/0", task_time_limit=100,
                                    visibility_timeout=200))
    conf = app.conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_time_limit == 100 < conf.broker_transport_options["visibility_timeout"] == 200
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert {q.name for q in conf.task_queues} == {"cpu", "gpu"}
    assert conf.worker_send_task_events
    assert "portq.convert" in app.tasks


def test_worker_main_process_does_not_import_torch():
    code = ("import sys; import portq.worker.app, portq.worker.main, portq.worker.jobs, portq.tasks.job; "
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
