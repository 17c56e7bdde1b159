"""Ending a process that has torch and the exporters loaded, without the interpreter's teardown.

When Python exits normally it tears down every module and frees every object one by one. With torch, torch's
compiler stack, onnx and onnxscript loaded, that teardown alone took 1.45 s on this project's 2-core machine
(0.5 s with torch only); with the exit handlers run and then `os._exit`, 0.06 s. Nothing of it is needed:
the operating system reclaims a process's memory at once. So the `portq` command (whose embedded default
loads all of it, `exit_now`) and the step forkserver (`skip_teardown_at_exit`) end this way:

1. the `atexit` handlers run, as in a normal exit: multiprocessing's (its forkserver and resource tracker),
   logging's flush, temporary folders' removal, whatever a library registered;
2. stdout and stderr are flushed;
3. `os._exit(code)`.

A process that still has threads of its own running (not daemons) exits normally: they are waited for. So does
one under a profiler or a debugger (`python -m cProfile -m portq.client ...` writes its file after the program
returns).

The forkserver's teardown also held the caller's stdout and stderr open: a forkserver inherits them, so
`portq submit ... | tee log`, or a program reading the command's output, waited 1.5 s more for the pipe's end.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

from portq.tasks.compat.cpython import run_exit_handlers


def exit_now(code: object = 0) -> None:
    """Exit with `code` as `sys.exit` would (None: 0; a string is printed to stderr and gives 1)."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    watched = sys.getprofile() is not None or sys.gettrace() is not None
    if others or watched or threading.current_thread() is not threading.main_thread():
        sys.exit(status)  # a normal exit waits for the threads, and lets a profiler write its results
    _end(status)


def skip_teardown_at_exit() -> None:
    """From now on, this process's normal exit (its code's end, `sys.exit`) skips the teardown: the exit handlers
    run, then `os._exit` with status 0. For a process whose exit status nobody reads: the step forkserver."""
    atexit.register(_exit_from_handler)


def _exit_from_handler() -> None:
    # Python has waited for the threads and is running the exit handlers, this one (registered last) first: run
    # the others now, then end before the teardown.
    atexit.unregister(_exit_from_handler)
    _end(0)


def _end(status: int) -> None:
    run_exit_handlers()  # CPython's own call at exit; prints what a handler raises
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`portq ... | head`), a closed stream
            pass
    os._exit(status)
