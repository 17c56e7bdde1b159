"""The `portq` commands, registered in one place on the Typer app. Each command lives in the module of its group
and calls `portq.client.api`; none registers itself, so no command module imports the command line.
"""

from __future__ import annotations

import typer
from portq.client import control, fuse, nightly, pool, results, serving, submit

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
    context_settings={"help_option_names": ["-h", "--help"]},
)

for command in (submit.submit, fuse.fuse, submit.optimize, results.status, results.report, control.wait,
                control.cancel, control.retry, control.workers, pool.worker, pool.examples, nightly.compare,
                nightly.history, serving.package, serving.verify):
    app.command()(command)


def command() -> typer.core.TyperGroup:
    """The app as the click command the CLI runs: a switch shows no `<bool>` in help (it takes no value)."""
    group = typer.main.get_command(app)
    for sub in [group, *getattr(group, "commands", {}).values()]:
        # made on demand, then kept by the command
        help_option = sub.get_help_option(typer.Context(sub, **group.context_settings))
        for param in [*sub.params, *([help_option] if help_option is not None else [])]:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
    return group


def _version(value: bool) -> None:
    if value:
        from portq import __version__

        typer.echo(f"portq {__version__}")
        raise typer.Exit()


@app.callback()
def _portq(version: bool = typer.Option(False, "--version", help="Print portq's version and exit.",
                                        callback=_version, is_eager=True)) -> None:
    pass
