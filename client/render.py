"""Terminal output: tables of jobs and artifacts, and a batch's live progress, via Rich."""

from __future__ import annotations

from typing import Any

from portq.client.progress import BatchProgress
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
    """Each job: its model and the file it came from, its state (a running job's step too), attempts, error."""
    table = Table(title=f"batch {batch}", title_justify="left")
    for col in ("model", "source", "target", "status", "attempts", "error"):
        table.add_column(col, overflow="fold")
    for r in records:
        state = f"[{STATUS_STYLE[r.status]}]{r.status.value}[/]"
        if r.status is JobStatus.running and r.step:
            state += f" ({escape(step_text(r.step))})"
        table.add_row(escape(r.model), escape(r.source), r.target.value, state, str(r.attempts),
                      escape(r.error or ""))
    return table


def summary_table(report: BatchReport, *, title: bool = True) -> Table:
    table = Table(title=f"batch {report.batch}" if title else None, title_justify="left")
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
def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def job_label(record: JobRecord) -> str:
    """A job as a line names it: the model, and the file it came from when that says more (albert.pt vs .pt2)."""
    return f"{record.model} ({record.source})" if record.source != record.model else record.model


class ProgressView:
    """A batch's progress on the terminal (stderr): a bar with done/total, elapsed and, once a job has finished,
    an ETA; a line per running job with the step it runs now; each job's result printed as it finishes (a
    failure with the first line of its error). Where stderr is not a terminal, only the finished lines. Call it
    with each `BatchProgress`; use it as a context manager."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.text import Text

        class BatchAndJobs(Progress):
            """The batch's bar, then one plain line per running job."""

            def get_renderables(self) -> Any:
                yield self.make_tasks_table([t for t in self.tasks if t.fields.get("eta") is not None])
                for task in self.tasks:
                    if task.fields.get("eta") is None:
                        yield Text.from_markup(task.description)

        self.progress = BatchAndJobs(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), console=console,
                                     transient=True, redirect_stdout=False, redirect_stderr=False)
        # No redirection: Rich's live display would swap sys.stdout/stderr for proxies and put back, when it stops,
        # whatever it found when it started. In the embedded default it starts from the watcher's thread while a
        # job's thread has its streams routed to the job's log (tasks/execution/capture.py), so it would put that
        # routing back after the job had ended it, and everything printed afterwards (the results table, the
        # report paths) would land in a discarded log. Output that must show goes through this console anyway.
        self.batch_task: Any = None
        self.job_tasks: dict[str, Any] = {}
        self.started = False

    def __enter__(self) -> ProgressView:
        return self  # the display starts with the first poll: nothing shows for a submission refused before it

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.progress.stop()

    def __call__(self, state: BatchProgress) -> None:
        p = self.progress
        for record in state.finished_now:
            p.console.print(finished_line(record), highlight=False)
        if not p.console.is_terminal:
            return  # a log or a pipe: the finished lines are the record; a live bar would only add noise
        if not self.started:
            p.start()
            self.started = True
        title = f"batch {state.batch}" + (f" ([red]{state.failed} failed[/])" if state.failed else "")
        eta = f"eta {_clock(state.eta_s)}" if state.eta_s is not None else ""
        if self.batch_task is None:
            self.batch_task = p.add_task(title, total=state.total or None, eta=eta)
        p.update(self.batch_task, description=title, total=state.total or None, completed=state.done, eta=eta)
        running = {r.job_id: r for r in state.running}
        for job_id in [j for j in self.job_tasks if j not in running]:
            p.remove_task(self.job_tasks.pop(job_id))
        for job_id, record in running.items():
            text = f"  {escape(job_label(record))}: {escape(step_text(record.step))}"
            if job_id in self.job_tasks:
                p.update(self.job_tasks[job_id], description=text)
            else:
                self.job_tasks[job_id] = p.add_task(text, total=None, eta=None)


def step_text(step: str | None) -> str:
    """A record's step as a progress line shows it."""
    return {None: "starting", "load": "loading the model", "source": "running the source model"}.get(step, step or "")


def finished_line(record: JobRecord) -> str:
    """One line for a job that has just finished (Rich markup)."""
    label = escape(job_label(record))
    if record.status is JobStatus.succeeded:
        return f"[green]✓[/] {label}: succeeded" + (" (cached)" if record.cached else "")
    if record.status is JobStatus.cancelled:
        return f"[yellow]-[/] {label}: cancelled"
    first = (record.error or "").strip().splitlines()[0] if (record.error or "").strip() else "failed"
    return f"[bold red]✗[/] {label}: failed: {escape(first)}"
