"""The step forkserver: one per process, started on first use (or ahead of it, `warm_up`), that imports torch
and the exporters once (`PRELOAD`, `portq.tasks.execution.step_preload`) and forks each isolated step's process
(`portq.tasks.execution.isolation`).

This module imports nothing of portq's contract or settings (pydantic): the `portq` command starts the
forkserver from here before its own imports (`portq.client.early`), so its imports begin as the process does.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from portq.tasks.compat import cpython
from portq.tasks.compat.cpython import forkserver_pid

#: Imported once by the forkserver, so each step's child starts with torch and the exporters loaded.
PRELOAD = ("portq.tasks.execution.step_preload",)
#: ... and after it, by the forkserver of a process that warms up ahead of its jobs (`exercise_on_start`): one tiny
#: export, so each step's child starts with the exporters' first-call work done
EXERCISE = "portq.tasks.execution.step_exercise"


def exercise_on_start() -> None:
    """This process's forkserver, when it starts, also runs the warm-up export (`EXERCISE`, about a second more),
    whoever starts it: the process's warm-up, or a job that arrives first. For a process that warms up ahead of
    its jobs; no effect once the forkserver runs."""
    if forkserver_pid() is None:  # its preload list is fixed once it runs
        forkserver().set_forkserver_preload([*PRELOAD, EXERCISE])


def warm_up(wait: bool = False) -> None:
    """Start this process's forkserver now, if it is not running: it imports torch and the exporters and
    builds the ONNX exporter's table (seconds) while the job builds its source and times it, instead of
    when the first artifact's step forks. Later calls cost nothing.

    `wait`: return only once the forkserver has finished that (a warm pool process does, in the background,
    so that its first job finds it ready)."""
    import multiprocessing.forkserver as server

    ctx = forkserver()
    try:
        server.ensure_running()
    except OSError:  # it starts on the first step then, as before
        return
    if wait:  # the forkserver forks only once its preload is done: a no-op child's start waits for that
        proc = ctx.Process(target=_no_op, name="portq-warm-check")
        allow_children(proc)
        with main_not_reimported():
            proc.start()
        proc.join(300)


def _no_op() -> None:
    pass


#: whether this process has started a step (`stop_if_unused`)
_STEPS_RUN = False


def mark_used() -> None:
    """A step is starting in this process's forkserver: it must not be stopped as unused."""
    global _STEPS_RUN
    _STEPS_RUN = True


def stop_if_unused() -> None:
    """Kill this process's forkserver if no step ever ran in it: one started ahead of a command's jobs that all
    turned out to be cache hits would otherwise finish its imports (seconds) after the command, holding the
    command's stdout and stderr, which a caller reading them waits for. Meant as an exit handler."""
    pid = forkserver_pid()
    if _STEPS_RUN or not pid:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@lru_cache(maxsize=1)
def forkserver() -> Any:
    """The multiprocessing context the steps run in (one forkserver per process, started on first use)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def allow_children(proc: Any) -> None:
    """Let a Celery prefork child start the step's process.

    Celery's pool children are marked daemonic, and multiprocessing refuses children to daemons so that
    they leave no orphans; a step's process dies with its forkserver, which dies with this process
    (`step_process._die_with_parent`), so lifting the rule leaves none. The pool child's auth key is billiard's type,
    which refuses to be pickled for a stdlib child; it becomes the stdlib's type, same bytes.
    """
    cpython.allow_children(proc)


@contextmanager
def main_not_reimported() -> Iterator[None]:
    """Start a step's process without it importing the caller's `__main__` again.

    multiprocessing makes a forkserver child import the parent's main script (or `-m` module), as spawn does,
    in case the target lives there. A step's target is portq's own code, and a user's script that calls
    `portq.submit` at its top level, without `if __name__ == "__main__":`, would run again in every step,
    which submitted the batch again and failed the step. So the main module's file and spec are hidden while the
    process starts.
    """
    with cpython.main_module_hidden():
        yield


def in_forkserver() -> bool:
    """Imported by multiprocessing's forkserver, as intended (not by a process that happened to import this)."""
    return cpython.called_from("multiprocessing.forkserver", "main")
