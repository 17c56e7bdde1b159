"""Ending a process without the interpreter's teardown keeps everything a normal exit does: the status, the exit
handlers, buffered output, and threads that are still working."""

import subprocess
import sys
import textwrap
from pathlib import Path


def run(code: str, tmp_path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_exit_now_keeps_the_status_the_exit_handlers_and_buffered_output(tmp_path):
    res = run("""
        import atexit, sys
        from pathlib import Path
        from portq.tasks.execution.process_exit import exit_now

        atexit.register(lambda: Path("handler-ran").write_text("yes"))
        sys.stdout.write("buffered, no newline")  # a pipe is block-buffered: still in the buffer at exit
        exit_now(3)
        Path("after-exit").write_text("must not run")
    """, tmp_path)
    assert res.returncode == 3, res.stderr
    assert res.stdout == "buffered, no newline"
    assert (tmp_path / "handler-ran").read_text() == "yes"
    assert not (tmp_path / "after-exit").exists()


def test_exit_now_with_a_message_prints_it_and_exits_1_as_sys_exit_does(tmp_path):
    res = run("""
        from portq.tasks.execution.process_exit import exit_now
        exit_now("bad things")
    """, tmp_path)
    assert res.returncode == 1 and res.stderr.strip() == "bad things"


def test_exit_now_waits_for_a_working_thread_as_a_normal_exit_does(tmp_path):
    res = run("""
        import threading, time
        from pathlib import Path
        from portq.tasks.execution.process_exit import exit_now

        def work():
            time.sleep(0.5)
            Path("thread-finished").write_text("yes")

        threading.Thread(target=work).start()  # not a daemon: the process waits for it
        exit_now(0)
    """, tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "thread-finished").read_text() == "yes"


def test_skip_teardown_at_exit_runs_the_other_exit_handlers_first(tmp_path):
    res = run("""
        import atexit, sys
        from pathlib import Path
        from portq.tasks.execution.process_exit import skip_teardown_at_exit

        atexit.register(lambda: Path("earlier-handler").write_text("yes"))
        skip_teardown_at_exit()
        atexit.register(lambda: Path("later-handler").write_text("yes"))
        sys.stdout.write("still flushed")
        sys.exit(0)
    """, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "still flushed"
    assert (tmp_path / "earlier-handler").exists() and (tmp_path / "later-handler").exists()


def test_a_profiled_command_still_gets_its_profile_written(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("from portq.tasks.execution.process_exit import exit_now\nexit_now(0)\n")
    res = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(tmp_path / "prof.out"), str(script)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "prof.out").stat().st_size > 0


def write_freeze_count(path: str) -> None:
    """A step process's view of the forkserver's preload (run in one by the test below)."""
    import gc
    from pathlib import Path

    Path(path).write_text(f"{gc.get_freeze_count()} {gc.isenabled()}")


def test_a_step_process_starts_with_the_forkserver_imports_frozen_and_the_caller_keeps_its_teardown(tmp_path):
    root = Path(__file__).resolve().parents[3]
    code = f"""
        import atexit, gc, sys
        from pathlib import Path
        from portq.tasks.execution import forkserver
        from tests.tasks.execution.test_process_exit import write_freeze_count

        forkserver.warm_up(wait=True)
        proc = forkserver.forkserver().Process(target=write_freeze_count, args=({str(tmp_path / "count")!r},))
        proc.start()
        proc.join(120)
        Path({str(tmp_path / "own")!r}).write_text(str(gc.get_freeze_count()))
        sys.exit(5)  # the forkserver's quick exit is its own: this process's status stays its own
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         cwd=root)
    assert res.returncode == 5, res.stderr[-2000:]
    frozen, collecting = (tmp_path / "count").read_text().split()
    assert int(frozen) > 100_000  # torch and the exporters, frozen in the forkserver
    assert collecting == "True"  # off while the forkserver imported, on again for the steps
    assert int((tmp_path / "own").read_text()) == 0  # importing portq froze nothing in the caller
