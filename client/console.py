"""Where the commands print: `out` (stdout: tables, ids, documents) and `err` (stderr: progress, notes, errors),
and the one way an error or a warning reaches the user. Every command module imports these; none imports the
command line (`portq.client.cli`) or the registry of commands (`portq.client.commands`).
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

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
