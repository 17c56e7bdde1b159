"""The step forkserver started as the `portq` command starts, for a command that will run jobs here.

The embedded default runs each artifact's step in a process forked from a forkserver that has imported torch,
torch.export's compiler stack and the exporters (`portq.tasks.execution.isolation`): 4-5 s of imports on 2
cores. A job starts it as soon as it knows it will run a step, and builds and times its source meanwhile; on a
first run of one small model that start is still what the first step waits for. Started here, 0.05-0.2 s into
the process, before the command's own imports (typer and rich: `main` is the command's entry point and imports
them only after the start), before the settings' model (pydantic: `runs_steps_here` reads the two settings it
needs from the environment) and before planning, where it started at 0.5-0.6 s. If every job turns out to be a
cache hit, it is killed at the command's exit (`stop_if_unused`), so the command ends at once.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Mapping

#: the commands that run jobs here when no broker is configured
RUNS_JOBS = {"submit", "fuse", "optimize"}


_started = False


def main() -> None:
    """The `portq` command: the step forkserver starts first (when the command will run jobs here), then the
    command line is imported and runs (`portq.client.cli.main`)."""
    import sys

    start_steps_early(sys.argv[1:])
    from portq.client.cli import main as command

    command()


#: what the settings read as a bool (pydantic's words, any case), for PORTQ_ISOLATE
_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def runs_steps_here(env: Mapping[str, str]) -> bool | None:
    """Whether the settings in `env` run jobs here with isolated steps (no broker, PORTQ_ISOLATE not off), read
    without the settings' model, whose import (pydantic) would delay the start by 0.3 s; None for a PORTQ_ISOLATE
    only the settings can judge."""
    if env.get("PORTQ_BROKER_URL"):
        return False
    isolate = env.get("PORTQ_ISOLATE") or "true"
    if isolate.lower() in _TRUE:
        return True
    if isolate.lower() in _FALSE:
        return False
    return None


def start_steps_early(argv: list[str]) -> bool:
    """Start the step forkserver when `argv` (the command's arguments) will run jobs in this process (once)."""
    global _started
    if _started:
        return True
    if not argv or argv[0] not in RUNS_JOBS or any(a in ("--help", "-h") for a in argv):
        return False
    if any(a == "--broker" or a.startswith("--broker=") for a in argv):
        return False
    here = runs_steps_here(os.environ)
    if here is None:  # a value only the settings can read (or reject: the command then says what is wrong)
        from portq.tasks.core.errors import PortqError
        from portq.tasks.core.settings import Settings

        try:
            settings = Settings.resolve()
        except PortqError:
            return False
        here = not settings.broker_url and settings.isolate
    if not here:
        return False
    from portq.tasks.execution.forkserver import stop_if_unused, warm_up

    warm_up()
    atexit.register(stop_if_unused)
    _started = True
    return True
