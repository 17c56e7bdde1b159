"""CPython's private parts that portq relies on are still there and still behave as portq uses them.

A Python upgrade that changes one of them fails here, by name, instead of in a step process far away.
"""

import multiprocessing
import subprocess
import sys
import textwrap

from portq.tasks.compat import cpython


def test_nothing_portq_relies_on_is_missing():
    assert cpython.check() == []


def test_the_forkserver_pid_appears_once_it_runs():
    script = textwrap.dedent("""
        import multiprocessing, multiprocessing.forkserver as server
        from portq.tasks.compat.cpython import forkserver_pid
        assert forkserver_pid() is None
        multiprocessing.get_context("forkserver")
        server.ensure_running()
        pid = forkserver_pid()
        import os
        os.kill(pid, 0)  # a live process
        print("ok", pid)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok "), done.stderr


def test_a_daemonic_process_may_start_a_child_once_allowed():
    from multiprocessing.process import AuthenticationString

    proc = multiprocessing.get_context("spawn").Process(target=print, daemon=True)
    saved = dict(multiprocessing.current_process()._config)
    try:
        multiprocessing.current_process()._config["authkey"] = b"billiard's bytes"
        cpython.allow_children(proc)
        assert proc.daemon is False
        key = multiprocessing.current_process()._config["authkey"]
        assert isinstance(key, AuthenticationString) and bytes(key) == b"billiard's bytes"
    finally:
        multiprocessing.current_process()._config.clear()
        multiprocessing.current_process()._config.update(saved)


def test_the_main_module_is_hidden_and_restored():
    main = sys.modules["__main__"]
    before = (main.__dict__.get("__file__"), main.__dict__.get("__spec__"))
    with cpython.main_module_hidden():
        assert "__file__" not in main.__dict__ and main.__spec__ is None
    assert (main.__dict__.get("__file__"), main.__dict__.get("__spec__")) == before


def test_the_stack_walk_finds_its_caller():
    def main():
        return cpython.called_from(__name__, "main")

    assert main() is True
    assert cpython.called_from("multiprocessing.forkserver", "main") is False


def test_exit_handlers_run_now_and_once():
    script = textwrap.dedent("""
        import atexit
        from portq.tasks.compat.cpython import run_exit_handlers
        atexit.register(print, "handler ran")
        run_exit_handlers()
        print("after")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["handler ran", "after"], done.stderr
