"""`portq status` and `portq report`: read a batch from the store (no broker needed)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from portq.client.console import err, out
from portq.client.options import StoreOpt
from portq.client.render import status_table, summary_table
from portq.tasks.core.errors import ConfigError
from portq.tasks.reports.content import batch_markdown
from portq.tasks.state import keys
from portq.tasks.state import records as batches
from portq.tasks.state.store import Store


class ReportFormat(str, Enum):
    table = "table"
    json = "json"
    md = "md"
    html = "html"


def status(
    batch: Annotated[str, typer.Argument(help="Batch id, as printed by `portq submit`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the batch's counts and each job's record as one "
                                                         "JSON document.")] = False,
    store: StoreOpt = None,
) -> None:
    """Each job's state: queued, running (and its step), succeeded, failed. Exit 1 if any job failed."""
    from portq.client import api

    records = api.status(batch, store=store)
    c = batches.counts(records)
    if as_json:
        typer.echo(json.dumps({"batch": batch, "counts": c, "jobs": [r.model_dump(mode="json") for r in records]},
                              indent=2))
    else:
        out.print(status_table(batch, records))
        out.print(", ".join(f"{k} {v}" for k, v in c.items() if v))
    raise typer.Exit(1 if c["failed"] else 0)


def report(
    batch: Annotated[str, typer.Argument(help="Batch id, as printed by `portq submit`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the batch report as one JSON document "
                                                         "(schema: batch-report.v3.json).")] = False,
    fmt: Annotated[ReportFormat, typer.Option("--format", help="table (terminal), json, md (Markdown summary) "
                                                               "or html (self-contained summary page).")]
    = ReportFormat.table,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the report to this file.")] = None,
    to_store: Annotated[bool, typer.Option("--to-store", help="With --format html: write the summary pages into the "
                                                              "store (batches/BATCH/summary.html and summary.md), "
                                                              "their links to the job reports relative to them.")]
    = False,
    store: StoreOpt = None,
) -> None:
    """Results per job and artifact: parity, p50 latency, speedup, the best pick, errors.

    A page written with -o links each job's report relative to where it is written; printed, it links them as
    from the batch's folder in the store (batches/BATCH/, where the summary page lies).
    """
    from portq.client import api

    rep = api.report(batch, store=store)
    base = str(output.resolve().parent) if output is not None else Store(rep.store).url(keys.batch_key(batch))
    if as_json:
        fmt = ReportFormat.json
    if to_store:
        from portq.tasks.reports.batch_pages import publish_summary

        if fmt is not ReportFormat.html or output is not None:
            raise ConfigError("--to-store writes the HTML page into the store: use it with --format html and "
                              "without --output", step="report")
        out.print(publish_summary(Store(rep.store), rep)["html"])
        return
    if fmt is ReportFormat.table and output is None:
        out.print(summary_table(rep))
        return
    if fmt is ReportFormat.json:
        text = json.dumps(rep.model_dump(mode="json"), indent=2) + "\n"
    elif fmt is ReportFormat.html:
        from portq.tasks.reports.html import batch_html

        text = batch_html(rep, base)
    else:  # md, or a table written to a file: Markdown is the table
        text = batch_markdown(rep, base)
    if output is None:
        # plain write: Rich would wrap and style a document meant for machines
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        err.print(f"wrote {output}")
