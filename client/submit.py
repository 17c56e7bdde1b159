"""`portq submit`: one job per model file (or per model and target of a manifest), onto the queue or run here;
`--wait` follows the batch.

Parsing, printing and exit codes only: the work is `portq.client.api` (`submit`, and `dispatch` for a manifest's
night and `portq fuse`), the same functions `import portq` offers, so the commands and the Python API take one
path. The options the commands share are declared once in `portq.client.options`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from portq.client import api
from portq.client.cli import BrokerOpt, StoreOpt, app, err, error, out, resolve, warning
from portq.client.options import (
    ArchKwargsOpt,
    ArchOpt,
    AtolOpt,
    BatchOpt,
    BatchSizesOpt,
    CalibrationOpt,
    DynamicOpt,
    ForceOpt,
    FormatsOpt,
    InputsOpt,
    JobFlags,
    LocaliseOpt,
    LossyPrecisionOpt,
    OpsetOpt,
    OptimizeOpt,
    OutputTolOpt,
    QuantileOpt,
    RtolOpt,
    RunsOpt,
    SeedOpt,
    TargetOpt,
    TimeoutOpt,
    ToleranceModeOpt,
    TolerancePrecisionOpt,
    TrustPickleOpt,
    WaitOpt,
    WarmupOpt,
)
from portq.client.render import ProgressView, summary_table
from portq.tasks.core.contract import BatchReport, Target
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.settings import Settings
from portq.tasks.state.store import Store


@app.command()
def submit(
    models: Annotated[list[str] | None, typer.Argument(help="Model files: TorchScript archives, .pt2 "
                                                            "ExportedPrograms, state dicts or safetensors (with "
                                                            "--arch).", show_default=False)] = None,
    manifest: Annotated[Path | None, typer.Option("--manifest", "-m", help="Submit a nightly manifest (YAML: model "
                                                                         "globs and their options) as one batch of "
                                                                         "its series, instead of MODELS.")] = None,
    target: TargetOpt = Target.cpu,
    formats: FormatsOpt = None,
    batch: BatchOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 0,
    inputs: InputsOpt = None,
    dynamic: DynamicOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    tolerance_mode: ToleranceModeOpt = None,
    quantile: QuantileOpt = None,
    tolerance_precision: TolerancePrecisionOpt = None,
    optimize: OptimizeOpt = None,
    precision: LossyPrecisionOpt = None,
    calibration: CalibrationOpt = None,
    output_tol: OutputTolOpt = None,
    localise: LocaliseOpt = True,
    opset: OpsetOpt = None,
    seed: SeedOpt = 0,
    runs: RunsOpt = None,
    warmup: WarmupOpt = None,
    batch_sizes: BatchSizesOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    force: ForceOpt = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
) -> None:
    """Enqueue one conversion job per model file (or run them here when no broker is configured)."""
    flags = JobFlags(target=target, formats=formats, inputs=inputs, dynamic=dynamic, atol=atol, rtol=rtol,
                     tolerance_mode=tolerance_mode, quantile=quantile, tolerance_precision=tolerance_precision,
                     optimize=optimize, precision=precision, calibration=calibration, output_tol=output_tol,
                     localise=localise, opset=opset, seed=seed, runs=runs, warmup=warmup, batch_sizes=batch_sizes,
                     arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    if manifest is not None:
        given = (["MODELS"] if models else []) + flags.given()
        if given:
            raise ConfigError(f"{', '.join(given)} cannot be combined with --manifest: the manifest gives every "
                              "job its models and options", step="submit",
                              hint="set them in the manifest's `defaults` or in a group")
        _submit_manifest(manifest, resolve(broker, store), batch=batch, force=force, wait=wait, timeout=timeout)
        return
    if not models:
        raise ConfigError("nothing to submit: give model files, or --manifest FILE", step="submit")
    with ProgressView(err) as view:
        report = api.submit(models, **flags.api_kwargs(), calibration=flags.calibration or [], batch=batch,
                            wait=wait, timeout=timeout, force=force, broker=broker, store=store, progress=view,
                            on_submitted=submitted, on_started=started)
    conclude(report)


def _submit_manifest(manifest: Path, settings: Settings, *, batch: str | None, force: bool, wait: bool,
                     timeout: float) -> None:
    """One night of a manifest: its jobs as one new batch of its series (portq.tasks.execution.night)."""
    from portq.tasks.execution.night import submit_night

    st = Store(settings.store)
    night = submit_night(manifest, st, max_bytes=settings.max_model_bytes,
                         max_sample_bytes=settings.max_sample_bytes, force=force, batch=batch)
    err.print(f"series {night.series}: {len(night.specs)} job(s) from {manifest} (`portq history {night.series}`)")
    for text in night.warnings:
        warning(text)
    send(night, st, settings, wait=wait, timeout=timeout)


def send(sub: api.Jobs, st: Store, settings: Settings, *, wait: bool, timeout: float) -> None:
    """Prepared jobs (a manifest's night, a fusion) through `api.dispatch`, printed as `portq submit` prints."""
    with ProgressView(err) as view:
        report = api.dispatch(sub, settings, st, wait=wait, timeout=timeout, progress=view, on_submitted=submitted,
                              on_started=started)
    conclude(report)


def conclude(report: BatchReport) -> None:
    """Exit with the batch's verdict when it was followed to its end; nothing more for a queued one."""
    if not all(job.status.finished for job in report.jobs):
        return  # queued, and not followed (no --wait)
    raise typer.Exit(finish(report))


def submitted(sub: api.Jobs, settings: Settings, st: Store) -> None:
    out.print(f"batch {sub.batch}")
    for rec in sub.rejected:
        error(rec.error or "")


def started(sub: api.Jobs, settings: Settings, st: Store) -> None:
    if settings.embedded:
        err.print(f"running {len(sub.specs)} job(s) here (no broker configured); store: {st.root}")
    else:
        err.print(f"queued {len(sub.specs)} job(s) on {settings.broker_display}; store: {st.root}")


def finish(report: BatchReport) -> int:
    """Print the batch's summary and where its reports are; 1 if any job failed."""
    out.print(summary_table(report))
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


def see_through(batch: str, timeout: float = 0, store: str | None = None) -> int:
    """Follow the batch to its end (at once when it has already finished), print its summary; 1 if a job failed."""
    with ProgressView(err) as view:
        report = api.wait(batch, timeout=timeout, store=store, progress=view)
    return finish(report)
