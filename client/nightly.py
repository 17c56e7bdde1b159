"""`portq compare` and `portq history`: nightly batches across nights, read from the store (no broker needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from portq.client.comparison import compared
from portq.client.console import err, out
from portq.client.options import JsonOpt, StoreOpt, resolve
from portq.client.render import comparison_table, history_table
from portq.client.results import ReportFormat
from portq.tasks.core.contract import BatchReport, Comparison, Verdict
from portq.tasks.core.errors import PortqError
from portq.tasks.reports.compare import comparison_markdown, regressions
from portq.tasks.reports.history import Trend, history_markdown, trends
from portq.tasks.state import records
from portq.tasks.state import series as series_index
from portq.tasks.state.store import Store
from rich.markup import escape

OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")]
FormatOpt = Annotated[ReportFormat, typer.Option("--format", help="table (terminal), json, md (Markdown) or html "
                                                                  "(self-contained page with plots).")]


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        typer.echo(text, nl=False)  # plain: Rich would wrap and style a document meant for machines
    else:
        output.write_text(text)
        err.print(f"wrote {output}")


def night_trends(st: Store, series: str | None, new: BatchReport, base: BatchReport,
                 last: int) -> tuple[list[str], list[Trend]]:
    """The nights to plot (the series' last `last` up to the new batch; else the two batches) and their trends."""
    chosen: list[BatchReport] = []
    if series is not None:
        batches = [e.batch for e in series_index.nights(st, series)]
        if new.batch in batches:
            for batch in batches[:batches.index(new.batch) + 1][-last:]:
                try:
                    chosen.append(records.batch_report(st, batch))
                except PortqError:
                    continue  # a night whose records are gone: a gap in the plot
    if not chosen:
        chosen = [base, new]
    return [b.batch for b in chosen], trends(chosen)


def compare(
    baseline: Annotated[str | None, typer.Argument(help="Baseline batch id (or a batch report .json file).",
                                                   show_default=False)] = None,
    new: Annotated[str | None, typer.Argument(help="New batch id (or a batch report .json file).",
                                              show_default=False)] = None,
    series: Annotated[str | None, typer.Option("--series", "-s", help="Compare the last two nights of this "
                                                                      "series instead.")] = None,
    latency_threshold: Annotated[float, typer.Option(help="Latency: a change must exceed this share of the "
                                                          "baseline p50 (and the noise).")] = 0.10,
    error_factor: Annotated[float, typer.Option(help="Parity: max abs error grown beyond this factor is a "
                                                     "regression.")] = 10.0,
    fmt: FormatOpt = ReportFormat.table,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
    history: Annotated[int, typer.Option(help="HTML: plot the series' last this many nights.")] = 30,
    store: StoreOpt = None,
) -> None:
    """What changed between two batches, per model x target x artifact. Exit 0: nothing regressed; 1: something
    regressed; 2: bad arguments (unknown batch, different stores, a batch with itself, no model in common)."""
    result, base_report, new_report, st = compared(baseline, new, series=series,
                                                   latency_threshold=latency_threshold, error_factor=error_factor,
                                                   store=store)
    _render(result, ReportFormat.json if as_json else fmt, output, st, base_report, new_report, history)
    _say(result)
    raise typer.Exit(1 if result.regressed else 0)


def _render(c: Comparison, fmt: ReportFormat, output: Path | None, st: Store, base: BatchReport, new: BatchReport,
            history: int) -> None:
    if fmt is ReportFormat.table and output is None:
        out.print(comparison_table(c))
        return
    if fmt is ReportFormat.json:
        text = json.dumps(c.model_dump(mode="json"), indent=2) + "\n"
    elif fmt is ReportFormat.html:
        from portq.tasks.reports.html import comparison_html

        labels, found = night_trends(st, c.series, new, base, history)
        text = comparison_html(c, labels, found)
    else:
        text = comparison_markdown(c)
    _emit(text, output)


def _say(c: Comparison) -> None:
    """The verdict on stderr, so that a CI log shows it whatever the format."""
    for r in c.rows:
        if r.verdict in (Verdict.regression, Verdict.inconclusive):
            colour = "bold red" if r.verdict is Verdict.regression else "yellow"
            err.print(f"[{colour}]{r.verdict.value}[/] "
                      + escape(f"{r.model}/{r.target.value}/{r.artifact or '-'}: " + "; ".join(r.reasons)))
    if c.regressed:
        err.print(f"[bold red]{len(regressions(c))} regression(s)[/] between {c.baseline} and {c.new}")
    else:
        err.print(f"no regression between {c.baseline} and {c.new}")


def history(
    series: Annotated[str, typer.Argument(help="Series name (the manifest's `series`, or its file name).")],
    fmt: FormatOpt = ReportFormat.table,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
    last: Annotated[int, typer.Option(help="Only the last this many nights (0: all).")] = 0,
    store: StoreOpt = None,
) -> None:
    """A series' nights: batch, date, jobs, failures, cache hits; html plots each model across the nights."""
    st = Store(resolve(store=store).store)
    h = series_index.history(st, series, last=last or None)
    if as_json:
        fmt = ReportFormat.json
    if fmt is ReportFormat.table and output is None:
        out.print(history_table(h))
        return
    if fmt is ReportFormat.json:
        text = json.dumps(h.model_dump(mode="json"), indent=2) + "\n"
    elif fmt is ReportFormat.html:
        from portq.tasks.reports.html import history_html

        reports = []
        for night in h.nights:
            try:
                reports.append(records.batch_report(st, night.batch))
            except PortqError:
                continue
        text = history_html(h, [r.batch for r in reports], trends(reports))
    else:
        text = history_markdown(h)
    _emit(text, output)
