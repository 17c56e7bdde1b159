"""`portq submit` and `portq optimize`: one job per model file (or per model and target of a manifest), onto the
queue or run here; `--wait` follows the batch.

Printing and exit codes only: the work is `portq.client.api` (`submit`, `optimize`, `night` and `dispatch`), the
same functions `import portq` offers, so the commands and the Python API take one path. Their options are the
request models' fields (`portq.tasks.core.requests`), made into flags by `portq.client.options.takes`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from portq.client import api
from portq.client.console import err, error, out, warning
from portq.client.options import BrokerOpt, JsonOpt, StoreOpt, takes
from portq.client.render import ProgressView, summary_table
from portq.tasks.core.contract import BatchReport
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.requests import ConvertRequest, OptimizeRequest
from portq.tasks.core.settings import Settings
from portq.tasks.state.store import Store


@takes(ConvertRequest, step="submit")
def submit(
    models: Annotated[list[str] | None, typer.Argument(help="Model files: TorchScript archives, .pt2 "
                                                            "ExportedPrograms, state dicts or safetensors (with "
                                                            "--arch); or Hugging Face model folders (config.json "
                                                            "and weights).", show_default=False)] = None,
    manifest: Annotated[Path | None, typer.Option("--manifest", "-m", help="Submit a nightly manifest (YAML: model "
                                                                         "globs and their options) as one batch of "
                                                                         "its series, instead of MODELS.")] = None,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
    *,
    request: ConvertRequest,
) -> None:
    """Enqueue one conversion job per model file (or run them here when no broker is configured)."""
    if manifest is not None:
        given = (["MODELS"] if models else []) + request.given(skip=("batch", "wait", "timeout", "force"))
        if given:
            raise ConfigError(f"{', '.join(given)} cannot be combined with --manifest: the manifest gives every "
                              "job its models and options", step="submit",
                              hint="set them in the manifest's `defaults` or in a group")
        night, settings, st = api.night(manifest, batch=request.batch, force=request.force, broker=broker,
                                        store=store)
        err.print(f"series {night.series}: {len(night.specs)} job(s) from {manifest} (`portq history "
                  f"{night.series}`)")
        for text in night.warnings:
            warning(text)
        send(night, st, settings, wait=request.wait, timeout=request.timeout, as_json=as_json)
        return
    if not models:
        raise ConfigError("nothing to submit: give model files, or --manifest FILE", step="submit")
    say = Say(as_json)
    with ProgressView(err) as view:
        report = api.submit(models, request, broker=broker, store=store, progress=view, on_submitted=say.submitted,
                            on_started=started)
    say.conclude(report)


@takes(OptimizeRequest, step="optimize")
def optimize(
    models: Annotated[list[Path], typer.Argument(help="ONNX files (a portq artifact's model.onnx included).")],
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
    *,
    request: OptimizeRequest,
) -> None:
    """Optimize existing ONNX files: each variant is measured against the file itself, and the fastest that passes
    parity is picked. Anything that is not ONNX is refused before work starts."""
    say = Say(as_json)
    with ProgressView(err) as view:
        report = api.optimize(models, request, broker=broker, store=store, progress=view, on_submitted=say.submitted,
                              on_started=started)
    say.conclude(report)


def send(sub: api.Jobs, st: Store, settings: Settings, *, wait: bool, timeout: float, as_json: bool = False) -> None:
    """Prepared jobs (a manifest's night, a fusion) through `api.dispatch`, printed as `portq submit` prints."""
    say = Say(as_json)
    with ProgressView(err) as view:
        report = api.dispatch(sub, settings, st, wait=wait, timeout=timeout, progress=view,
                              on_submitted=say.submitted, on_started=started)
    say.conclude(report)


@dataclass
class Say:
    """How a command that makes jobs prints: `batch ID` then the summary table on stdout (the batch named once),
    or with `--json` the batch report as one JSON document and nothing else on stdout. Notes and errors go to
    stderr either way."""

    as_json: bool = False

    def submitted(self, sub: api.Jobs, settings: Settings, st: Store) -> None:
        if not self.as_json:
            out.print(f"batch {sub.batch}")
        for note in getattr(sub, "notes", []):
            warning(note)
        for rec in sub.rejected:
            error(rec.error or "")

    def conclude(self, report: BatchReport) -> None:
        """Exit with the batch's verdict when it was followed to its end; nothing more for a queued one (but its
        JSON with --json)."""
        done = all(job.status.finished for job in report.jobs)
        if self.as_json:
            typer.echo(json.dumps(report.model_dump(mode="json"), indent=2))
            if done:
                raise typer.Exit(finish(report, table=False))
            return
        if done:
            raise typer.Exit(finish(report, title=False))


def started(sub: api.Jobs, settings: Settings, st: Store) -> None:
    if settings.embedded:
        err.print(f"running {len(sub.specs)} job(s) here (no broker configured); store: {st.root}")
    else:
        err.print(f"queued {len(sub.specs)} job(s) on {settings.broker_display}; store: {st.root}")


def finish(report: BatchReport, *, table: bool = True, title: bool = True) -> int:
    """Print the batch's summary and where its reports are; 1 if any job failed."""
    if table:
        out.print(summary_table(report, title=title))
    hits = sum(j.cached for j in report.jobs)
    if hits:
        err.print(f"{hits} of {report.counts['total']} job(s) were cache hits (unchanged model and options: served "
                  "from the cache, not converted again)")
    pages = api.summary_pages(report.batch, store=report.store)
    err.print(f"reports: summary page {pages['html']} (Markdown: {pages['md']}); each job's report.html and "
              f"report.md are in its result folder, linked from the summary page")
    err.print(f"summary page elsewhere: portq report {report.batch} --format html -o summary.html")
    failed = report.counts.get("failed", 0)
    if failed:
        err.print(f"[bold red]{failed} of {report.counts['total']} job(s) failed[/]: `portq report {report.batch}` "
                  "for details")
        return 1
    return 0


def see_through(batch: str, timeout: float = 0, store: str | None = None, as_json: bool = False) -> int:
    """Follow the batch to its end (at once when it has already finished), print its summary (or its report as
    JSON); 1 if a job failed."""
    with ProgressView(err) as view:
        report = api.wait(batch, timeout=timeout, store=store, progress=view)
    if as_json:
        typer.echo(json.dumps(report.model_dump(mode="json"), indent=2))
    return finish(report, table=not as_json)
