"""The `portq` command starts the step forkserver as it starts when it will run jobs here, and kills it at its
exit when no step ran (all cache hits): a caller reading the command's output does not wait for its imports."""

import os
import subprocess
import sys
import textwrap

import pytest
from portq.client.early import runs_steps_here, start_steps_early
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.settings import Settings


@pytest.mark.parametrize("argv,env", [
    (["status", "b1"], {}),  # runs no jobs
    (["submit", "m.pt", "--help"], {}),
    (["submit", "m.pt", "--broker", "redis://127.0.0.1:6379/0"], {}),
    (["submit", "m.pt"], {"PORTQ_BROKER_URL": "redis://127.0.0.1:6379/0"}),  # the queue runs them
    (["submit", "m.pt"], {"PORTQ_ISOLATE": "0"}),  # steps run in-process: no forkserver
])
def test_no_forkserver_for_a_command_that_runs_no_steps_here(argv, env, monkeypatch):
    for var in ("PORTQ_BROKER_URL", "PORTQ_ISOLATE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert start_steps_early(argv) is False


def test_a_forkserver_started_early_and_never_used_is_gone_when_the_command_exits(tmp_path):
    code = """
        import multiprocessing.forkserver as server
        from portq.client.early import start_steps_early
        from portq.tasks.execution.process_exit import exit_now

        assert start_steps_early(["submit", "model.pt"])
        print(server._forkserver._forkserver_pid, flush=True)
        exit_now(0)  # as the command exits: no step ran (every job was a cache hit)
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PORTQ_BROKER_URL", "PORTQ_ISOLATE")}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    pid = int(res.stdout.split()[0])
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left to finish its imports
        os.kill(pid, 0)


def test_the_command_starts_the_forkserver_before_importing_its_command_line(tmp_path):
    """The entry point (`portq` and `python -m portq.client`) starts the forkserver, then imports typer and rich (the
    command line's own imports) and runs the command, here a submit of a file that is not there."""
    code = """
        import atexit
        import sys
        import multiprocessing.forkserver as server
        import portq.client.early as early

        sys.argv = ["portq", "submit", "missing.pt"]
        started = []
        real = early.start_steps_early
        early.start_steps_early = lambda argv: started.append(("typer" in sys.modules, real(argv)))
        # the command ends with os._exit after the exit handlers (process_exit.exit_now)
        atexit.register(lambda: print(started[0], server._forkserver._forkserver_pid is not None, flush=True))
        early.main()
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")} | {"PORTQ_STORE": str(tmp_path / "s")}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    # first: typer not imported yet, and the forkserver started (the command line's own call finds it started)
    assert "(False, True) True" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "missing.pt" in res.stdout + res.stderr and res.returncode == 2  # and the command ran: it refused the path


@pytest.mark.parametrize("env", [
    {}, {"PORTQ_ISOLATE": ""}, {"PORTQ_BROKER_URL": ""}, {"PORTQ_BROKER_URL": "redis://127.0.0.1:6379/0"},
    *({"PORTQ_ISOLATE": v} for v in ("1", "0", "true", "False", "ON", "off", "t", "F", "y", "N", "yes", "no")),
    {"PORTQ_ISOLATE": "0", "PORTQ_BROKER_URL": "redis://h:6379/0"},
])
def test_the_early_reading_of_the_settings_is_the_settings_own(env):
    """The command decides to start the forkserver without importing the settings' model: it must decide as the
    settings do."""
    settings = Settings.resolve(env=env)
    assert runs_steps_here(env) is (not settings.broker_url and settings.isolate)


@pytest.mark.parametrize("value", ["2", "maybe", " yes ", "00"])
def test_a_value_the_early_reading_does_not_know_is_left_to_the_settings(value):
    assert runs_steps_here({"PORTQ_ISOLATE": value}) is None
    with pytest.raises(ConfigError):  # which reject it, and the command says so
        Settings.resolve(env={"PORTQ_ISOLATE": value})
