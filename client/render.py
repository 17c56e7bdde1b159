"""Terminal output: tables of jobs and artifacts, via Rich."""

from __future__ import annotations

from portq.tasks.core.contract import BatchReport, Comparison, JobRecord, JobStatus, SeriesHistory
from portq.tasks.reports.compare import COMPARE_COLUMNS, comparison_rows
from portq.tasks.reports.content import SUMMARY_COLUMNS, summary_rows
from portq.tasks.reports.history import HISTORY_COLUMNS, history_rows
from rich.markup import escape
from rich.table import Table

STATUS_STYLE = {
    JobStatus.queued: "dim", JobStatus.running: "cyan", JobStatus.succeeded: "green",
    JobStatus.failed: "bold red", JobStatus.cancelled: "yellow",
}

CELL_STYLE = {"succeeded": "[green]succeeded[/]", "failed": "[bold red]failed[/]", "pass": "[green]pass[/]",
              "FAIL": "[bold red]FAIL[/]", "skipped": "[yellow]skipped[/]", "regression": "[bold red]regression[/]",
              "inconclusive": "[yellow]inconclusive[/]", "improvement": "[green]improvement[/]"}


def status_table(batch: str, records: list[JobRecord]) -> Table:
    table = Table(title=f"batch {batch}", title_justify="left")
    for col in ("model", "target", "status", "attempts", "error"):
        table.add_column(col, overflow="fold")
    for r in records:
        table.add_row(r.model, r.target.value, f"[{STATUS_STYLE[r.status]}]{r.status.value}[/]",
                      str(r.attempts), escape(r.error or ""))
    return table


def summary_table(report: BatchReport) -> Table:
    table = Table(title=f"batch {report.batch}", title_justify="left")
    for col in SUMMARY_COLUMNS:
        table.add_column(col, overflow="fold", no_wrap=col in ("p50 ms", "speedup"))
    for row in summary_rows(report):
        table.add_row(*(CELL_STYLE.get(cell, escape(cell)) for cell in row))
    return table


def comparison_table(c: Comparison) -> Table:
    table = Table(title=f"compare {c.baseline} -> {c.new}", title_justify="left")
    for col in COMPARE_COLUMNS:
        table.add_column(col, overflow="fold", no_wrap=col in ("verdict", "change"))
    for row in comparison_rows(c):
        table.add_row(*(CELL_STYLE.get(cell, escape(cell)) for cell in row))
    return table


def history_table(h: SeriesHistory) -> Table:
    table = Table(title=f"series {h.series}", title_justify="left")
    for col in HISTORY_COLUMNS:
        table.add_column(col, overflow="fold")
    for row in history_rows(h):
        table.add_row(*(escape(cell) for cell in row))
    return table
