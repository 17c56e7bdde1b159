"""CPython's private parts that portq's step processes use: multiprocessing's forkserver and process config,
`atexit`'s run-now call, and a frame walk. Standard library only (the forkserver module imports this before
pydantic or torch).

Each is used where the public API has no equivalent:
- the forkserver's pid: to stop a forkserver that never forked (`multiprocessing` only stops it at exit);
- a process's `_config`: to let a Celery (daemonic) pool child start a step's process, with the stdlib's
  `AuthenticationString` in place of billiard's;
- `atexit._run_exitfuncs`: to run the exit handlers, then end with `os._exit` before the interpreter's teardown;
- the `__main__` module's `__spec__`/`__file__`: hidden so a forkserver child does not import the user's script;
- `sys._getframe`: to tell that multiprocessing's forkserver itself is importing a module.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def forkserver_pid() -> int | None:
    """The pid of this process's forkserver, None before it is started."""
    import multiprocessing.forkserver as server

    return getattr(getattr(server, "_forkserver", None), "_forkserver_pid", None)


def allow_children(proc: Any) -> None:
    """Lift the daemon flag of this process and of `proc` (so a daemonic pool child can start `proc`) and give
    both the stdlib's authentication key type (billiard's refuses to be pickled for a stdlib child)."""
    from multiprocessing.process import AuthenticationString  # type: ignore[attr-defined]

    for config in (multiprocessing.current_process()._config, proc._config):  # type: ignore[attr-defined]
        if config.get("daemon"):
            config["daemon"] = False
        key = config.get("authkey")
        if not isinstance(key, AuthenticationString):
            config["authkey"] = AuthenticationString(bytes(key) if key else os.urandom(32))


@contextmanager
def main_module_hidden() -> Iterator[None]:
    """While inside: the `__main__` module shows no file and no spec, so a spawn or forkserver child does not
    import it again."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    hidden: dict[str, Any] = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(hidden)


def called_from(module: str, function: str) -> bool:
    """Whether `module.function` is on the calling stack."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == function and frame.f_globals.get("__name__") == module:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def run_exit_handlers() -> None:
    """Run (and clear) the `atexit` handlers now, as the interpreter does at exit (printing what one raises)."""
    atexit._run_exitfuncs()  # type: ignore[attr-defined]


def check() -> list[str]:
    """What this Python no longer has of the above (empty when all is there)."""
    import multiprocessing.forkserver as server
    import multiprocessing.process as process

    missing = []
    if not hasattr(getattr(server, "_forkserver", None), "_forkserver_pid"):
        missing.append("multiprocessing.forkserver._forkserver._forkserver_pid")
    if not isinstance(getattr(multiprocessing.current_process(), "_config", None), dict):
        missing.append("multiprocessing.current_process()._config (a dict)")
    if not isinstance(getattr(process, "AuthenticationString", None), type):
        missing.append("multiprocessing.process.AuthenticationString")
    if not callable(getattr(atexit, "_run_exitfuncs", None)):
        missing.append("atexit._run_exitfuncs")
    if not callable(getattr(sys, "_getframe", None)):
        missing.append("sys._getframe")
    if not callable(getattr(server, "main", None)):
        missing.append("multiprocessing.forkserver.main (the function whose frame marks the forkserver)")
    return missing
