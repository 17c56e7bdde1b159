"""`portq`: the command line's one error boundary (`run`): a PortqError becomes `[error] ...` on stderr and exit
code 1 (2 for bad settings or options, 3 when following a batch timed out); nothing else prints tracebacks at
users. The commands (registered in `portq.client.commands`) print and set exit codes; the work is
`portq.client.api`'s.

Exit codes: 0 success; 1 a job failed or an operation failed (`compare`: something regressed); 2 bad usage
or settings (`compare`: batches that cannot be compared); 3 following a batch timed out; 130 interrupted.
"""

from __future__ import annotations

import sys

import typer
from portq.client.console import err, error
from portq.tasks.core.errors import ConfigError, PortqError, WaitTimeout, validation_problems
from rich.markup import escape


def main() -> None:
    """The command line, after the entry point (`portq.client.early.main`) started what it runs early: its exit
    skips the interpreter's teardown of torch (`process_exit`: over a second)."""
    from portq.tasks.execution.process_exit import exit_now

    try:
        run()
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)


def run() -> None:
    from portq.client.commands import command
    from pydantic import ValidationError

    try:
        rc = command()(standalone_mode=False)
    except ConfigError as e:
        error(e.message)
        sys.exit(2)
    except WaitTimeout as e:
        err.print(f"[yellow]{escape(e.message)}[/]")
        sys.exit(3)
    except PortqError as e:
        error(e.message)
        sys.exit(1)
    except ValidationError as e:  # a value pydantic refused that no command converted: still one line of portq's
        error(f"[step options] {validation_problems(e)}")
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted; queued jobs keep running on the workers (`portq status BATCH`)")
        sys.exit(130)
    except OSError as e:  # a path the command was given or must write that the system refuses: one line, no trace
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "portq")
        where = f"{e.filename}: " if e.filename else ""
        error(ConfigError(f"{where}{e.strerror or e}", step=command,
                          hint="check the path and its permissions").message)
        sys.exit(2)
    except Exception as e:
        # click's usage errors (Typer vendors its own click, so match on behaviour, not on the class)
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)
