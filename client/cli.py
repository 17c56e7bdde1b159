"""`portq`: the command line. One error boundary (`_main`): a PortqError becomes `[error] ...` on stderr
and exit code 1 (2 for bad settings or options, 3 when following a batch timed out); nothing else prints
tracebacks at users. The commands parse, print and set exit codes; the work is `portq.client.api`'s.

Exit codes: 0 success; 1 a job failed or an operation failed (`compare`: something regressed); 2 bad usage
or settings (`compare`: batches that cannot be compared); 3 following a batch timed out; 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from portq.tasks.core.errors import ConfigError, PortqError, WaitTimeout, validation_problems
from portq.tasks.core.settings import Settings
from rich.console import Console
from rich.markup import escape

#: exit codes scripts can rely on
EXIT_CODES = {0: "success", 1: "a job failed, or the operation failed", 2: "bad usage, options or settings",
              3: "--timeout expired while following a batch (its jobs carry on)", 130: "interrupted (Ctrl-C)"}

app = typer.Typer(
    name="portq",
    help="Convert PyTorch models to ONNX, TorchScript, ExportedProgram and AOTInductor on a job queue, "
         "with parity and latency evidence for every artifact.\n\n"
         "Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + ".",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
# Piped output is for files and scripts: wide enough that a table's cells do not fold (a long model path beside a
# latency marked "(unstable)" passed 200 columns)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 320)


def error(message: str) -> None:
    """The one way errors reach the user: `[error] ...` on stderr, never parsed as markup."""
    err.print(f"[bold red]\\[error][/] {escape(message)}")


def warning(message: str) -> None:
    """Something the user should know that does not stop the command: `[warning] ...` on stderr."""
    err.print(f"[yellow]\\[warning][/] {escape(message)}")

BrokerOpt = Annotated[
    str | None,
    typer.Option("--broker", envvar="PORTQ_BROKER_URL", show_envvar=True,
                 help="Redis URL of the queue (redis://host:6379/0, rediss:// for TLS). Unset: run jobs locally."),
]
StoreOpt = Annotated[
    str | None,
    typer.Option("--store", envvar="PORTQ_STORE", show_envvar=True,
                 help="Shared storage for models, artifacts and reports: a directory or an fsspec URL. "
                      "[default: ./portq-store]"),
]


def resolve(broker: str | None = None, store: str | None = None, **flags: object) -> Settings:
    return Settings.resolve(broker_url=broker, store=store, **flags)


def main() -> None:
    """The `portq` command: its exit skips the interpreter's teardown of torch (`process_exit`: over a second)."""
    from portq.client.early import start_steps_early
    from portq.tasks.execution.process_exit import exit_now

    start_steps_early(sys.argv[1:])
    try:
        _main()
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)


def _main() -> None:
    from portq.client import control, fuse, nightly, optimize, pool, results, submit  # noqa: F401  (registration)
    from pydantic import ValidationError

    try:
        rc = app(standalone_mode=False)
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
    except Exception as e:
        # click's usage errors (Typer vendors its own click, so match on behaviour, not on the class)
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)

