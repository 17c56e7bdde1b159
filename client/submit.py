"""`portq submit`: one job per model file (or per model and target of a manifest), onto the queue or run here;
`--wait` follows the batch.

`send` (queue or run here, then follow) serves every command that makes jobs (`portq fuse` and `portq optimize`
too); the options they share are declared once in `portq.client.options`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Protocol

import typer
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
    validation_problems,
)
from portq.client.render import summary_table
from portq.tasks.core.contract import JobRecord, JobSpec, Target
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.settings import Settings
from portq.tasks.state import records as batches
from portq.tasks.state.store import Store
from portq.tasks.state.submission import prepare
from pydantic import ValidationError


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
    settings = resolve(broker, store)
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
        _submit_manifest(manifest, settings, batch=batch, force=force, wait=wait, timeout=timeout)
        return
    if not models:
        raise ConfigError("nothing to submit: give model files, or --manifest FILE", step="submit")
    options, load = flags.job_options(), flags.load_options()
    st = Store(settings.store)
    st.check()  # unreachable, missing bucket, no credentials, read-only: said now, naming the store
    try:
        sub = prepare(models, st, batch=batch, options=options, load=load, force=force,
                      calibration=flags.calibration_files(), max_bytes=settings.max_model_bytes,
                      max_sample_bytes=settings.max_sample_bytes)
    except ValidationError as e:  # pydantic validation of the options
        raise ConfigError(validation_problems(e), step="submit") from None
    send(sub, st, settings, wait=wait, timeout=timeout)


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


class Jobs(Protocol):
    """What `send` needs of a submission (a Submission, a manifest's night)."""

    batch: str
    specs: list[JobSpec]
    rejected: list[JobRecord]


def send(sub: Jobs, st: Store, settings: Settings, *, wait: bool, timeout: float) -> None:
    """Print the batch, queue its jobs (or run them here when no broker is configured) and, with `wait`,
    follow the batch to its end: exit 1 when a job failed (always followed in embedded mode), 3 on timeout."""
    out.print(f"batch {sub.batch}")
    for rec in sub.rejected:
        error(rec.error or "")
    if settings.embedded:
        err.print(f"running {len(sub.specs)} job(s) here (no broker configured); store: {st.display}")
        _run_embedded(sub.specs, st, settings)
        wait = True
    else:
        from portq.client.dispatch import enqueue

        enqueue(sub.specs, settings, st)
        err.print(f"queued {len(sub.specs)} job(s) on {settings.broker_display}; store: {st.display}")
    if not wait:
        return
    raise typer.Exit(see_through(st, sub.batch, timeout))


def _run_embedded(specs: list[JobSpec], st: Store, settings: Settings) -> None:
    from portq.client.dispatch import run_here
    from rich.progress import Progress

    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("converting", total=len(specs))
        run_here(specs, st, settings, on_done=lambda report: progress.advance(task))


def follow(st: Store, batch: str, timeout: float = 0, poll: float = 0.5) -> list[JobRecord]:
    """Poll the batch's records in the store until every job has finished (works across client restarts)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(f"batch {batch}", total=None)
        reader = batches.RecordReader(st, batch)  # each poll fetches only the records that changed
        while True:
            records = reader.read()
            done = sum(r.status.finished for r in records)
            failed = sum(r.status.value == "failed" for r in records)
            progress.update(task, total=len(records), completed=done,
                            description=f"batch {batch}" + (f" ([red]{failed} failed[/])" if failed else ""))
            if records and done == len(records):
                return records
            if timeout and time.monotonic() - start > timeout:
                err.print(f"[yellow]timed out after {timeout:g}s; {len(records) - done} job(s) still unfinished[/]")
                raise typer.Exit(3)
            time.sleep(poll)


def see_through(st: Store, batch: str, timeout: float = 0) -> int:
    """Follow the batch to its end (at once when it has already finished), print its summary; 1 if a job failed."""
    records = follow(st, batch, timeout=timeout)
    return finish(st, batch, records)


def finish(st: Store, batch: str, records: list[JobRecord] | None = None) -> int:
    """Print the batch summary; 1 if any job failed."""
    report = batches.batch_report(st, batch, records)
    out.print(summary_table(report))
    hits = sum(j.cached for j in report.jobs)
    if hits:
        err.print(f"{hits} of {report.counts['total']} job(s) were cache hits (unchanged model and options: served "
                  "from the cache, not converted again)")
    failed = report.counts.get("failed", 0)
    if failed:
        total = report.counts["total"]
        err.print(f"[bold red]{failed} of {total} job(s) failed[/]: `portq report {batch}` for details")
        return 1
    return 0

