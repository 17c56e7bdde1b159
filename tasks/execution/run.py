"""Running one admitted job: build its source, gather the evidence, then each artifact's step; the job's
error boundary.

`run_job` never raises for a job's own failure: whatever goes wrong is recorded, with its step, file and
cause, in the job's report and state record, and the caller (a Celery task, or the embedded runner)
carries on. Only `TransientError` and `StoreError` (storage trouble) escape, so the queue can retry them. Whether a
delivery runs at all is decided before, by `portq.tasks.state.delivery.admit`, for the queue and the
embedded default alike; which status the job's record says is decided by `portq.tasks.state.lifecycle`.

Artifacts are written into the job's working folder, each into a folder named by its artifact id; the
report's paths are relative to the job's folder, and the folder's URL is set once, when it publishes.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from portq.tasks.core.contract import (
    ArtifactReport,
    Failure,
    JobReport,
    JobSpec,
    JobStatus,
    StepStatus,
    read_versioned,
    utcnow,
)
from portq.tasks.core.errors import InputError, PortqError, StoreError, TransientError, first_line
from portq.tasks.core.toolchain import toolchain, worker_name
from portq.tasks.execution.capture import LOG_FILE, captured
from portq.tasks.execution.isolation import InProcess, Isolation

if TYPE_CHECKING:
    from portq.tasks.checks.evidence import SourceEvidence
    from portq.tasks.formats.selection import Planned
    from portq.tasks.sources.loading import LoadedModel
from portq.tasks.state import lifecycle, records
from portq.tasks.state.keys import failed_key, result_key
from portq.tasks.state.store import Store

REPORT_FILE = "report.json"


def workdir_prefix(job_id: str) -> str:
    """A job's working folder (in the system temp dir) starts with this; `workdir_glob` finds leftovers."""
    return f"portq-job-{job_id}-"


def workdir_glob(job_id: str = "*") -> str:
    """Working folders of one job (or of all jobs) that a killed process could not remove."""
    return os.path.join(tempfile.gettempdir(), workdir_prefix(job_id) + "*")


def run_job(spec: JobSpec, store: Store, *, worker: str | None = None, isolation: Isolation | None = None) -> JobReport:
    """Run (or serve from the cache) one job and record its outcome.

    `isolation` runs each artifact's step; the default runs them here.
    """
    worker = worker or worker_name()
    try:
        record = records.read_record(store, spec.batch_id, spec.job_id)
    except StoreError as e:
        raise TransientError(e.cause, step="store") from e
    if record is None:  # admitted jobs have one: this is a caller's mistake, not the job's
        raise InputError(f"job {spec.job_id} has no record in store {store.display}", step="receive",
                         hint="submit it to this store (`delivery.admit` says what to do with such a delivery)")
    tools = toolchain()
    key = spec.job_key(tools)
    cache = result_key(key)

    cached = None if spec.force else _committed(store, cache)
    if cached is not None:
        report = read_versioned(JobReport, store.read_json(f"{cached}/{REPORT_FILE}"), store.url(cached))
        if report.status is JobStatus.succeeded:
            lifecycle.served_from_cache(store, record, cached)
            return report.model_copy(update={"cached": True, "job_id": spec.job_id, "batch": spec.batch_id,
                                             "model": spec.model})

    if lifecycle.started(store, record, worker).status is not JobStatus.running:  # cancelled meanwhile
        return JobReport(job_id=spec.job_id, job_key=key, kind=spec.kind, batch=spec.batch_id, model=spec.model,
                         source=spec.display, target=spec.target, status=record.status, error=record.error,
                         toolchain=tools, worker=worker)
    isolation = isolation or InProcess()
    isolation.prepare()  # not for a cached job: nothing of it runs
    report = JobReport(job_id=spec.job_id, job_key=key, kind=spec.kind, batch=spec.batch_id, model=spec.model,
                       source=spec.display, target=spec.target, status=JobStatus.running, toolchain=tools,
                       worker=worker, started_at=utcnow(), trust_pickle=spec.source.trust_pickle,
                       trust_remote_code=getattr(spec.source, "trust_remote_code", False))
    report.queued_s = _seconds_between(spec.submitted_at, report.started_at)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=workdir_prefix(spec.job_id)) as tmp:
        workdir = Path(tmp)
        try:
            with captured(workdir / LOG_FILE):
                _convert(spec, store, workdir, report, isolation,
                         on_step=lambda step: lifecycle.note_step(store, record, step))
        except (TransientError, StoreError):
            raise  # storage trouble: the queue retries the job, with backoff
        except PortqError as e:
            _fail(report, e.at(file=spec.display))
        except Exception as e:  # a bug in portq or a library: still a recorded failure, never a dead worker
            _fail(report, PortqError(f"internal error: {type(e).__name__}: {first_line(e)}", step="job",
                                     file=spec.display, hint="please report this with the job's report.json"))
            report.inputs.append({"traceback": traceback.format_exc(limit=8)})
        if report.status is JobStatus.running:
            bad = [a for a in report.artifacts if (a.status is StepStatus.failed or (a.parity and not a.parity.passed))
                   and not _searched(spec, a)]
            report.status = JobStatus.failed if bad else JobStatus.succeeded
            if bad:
                report.error = "; ".join(_artifact_problem(a) for a in bad)
        if report.status is JobStatus.succeeded:
            final = cache if not spec.force else f"{cache}-{spec.job_id}"
        else:
            final = failed_key(spec.job_id)
        # the folder this delivery publishes: the result key itself, or a folder of its own on an object store
        publication = store.publication(final)
        report.result = store.url(publication.folder)
        report.finished_at = utcnow()
        report.duration_s = round(time.perf_counter() - start, 3)
        _write_reports(workdir, report, store, spec)
        try:
            published = store.publish_dir(workdir, publication, commit_file=REPORT_FILE)
        except StoreError as e:
            raise TransientError(e.cause, step="publish", hint=e.hint) from e
        except OSError as e:
            raise TransientError(f"cannot publish {store.url(final)}: {e.strerror or e}", step="publish") from e
    # a second delivery that lost the race points at the first one's folder: one result per job key
    lifecycle.finished(store, record, report, published.folder)
    return report


def _committed(store: Store, key: str) -> str | None:
    try:
        return store.committed(key, REPORT_FILE)
    except StoreError as e:
        raise TransientError(e.cause, step="store", hint=e.hint) from e
#: step phases worth a write of the job's record (opening a session is over in a moment)
PROGRESS_PHASES = ("source", "export", "parity", "latency", "localise")


def progress(on_step: Callable[[str], None]) -> Callable[[str], None]:
    """The steps' phase callback: passes on the phases a progress display shows."""
    def on_phase(step: str) -> None:
        if step.split(":", 1)[0] in PROGRESS_PHASES:
            on_step(step)

    return on_phase


def _artifact_problem(a: ArtifactReport) -> str:
    if a.status is StepStatus.failed:
        return f"{a.id}: {a.error}"
    assert a.parity is not None
    from portq.tasks.checks.parity import failure_summary

    return f"{a.id}: {failure_summary(a.parity)}"


def _searched(spec: JobSpec, a: ArtifactReport) -> bool:
    """An artifact `--optimize auto` added in its search: one that fails is a data point of the search (its report
    says why), not a failure of the job, which asked for the fastest artifact, not for that one."""
    optimize = spec.options.optimize
    return optimize is not None and "auto" in optimize.candidates and a.requested_by != "request"


def _fail(report: JobReport, e: PortqError) -> None:
    report.status = JobStatus.failed
    report.error = e.message
    report.failure = Failure(**e.to_dict())  # type: ignore[arg-type]


def _write_reports(workdir: Path, report: JobReport, store: Store, spec: JobSpec) -> None:
    """report.md, report.html, report.json, then each artifact's provenance record (which holds report.json's
    digest)."""
    from portq.tasks.reports.batch_pages import summary_link
    from portq.tasks.reports.content import job_markdown
    from portq.tasks.reports.html import JOB_FILES, job_html
    from portq.tasks.reports.provenance import record_path, write_records

    start = time.perf_counter()
    for artifact in report.artifacts:
        if artifact.path and (workdir / artifact.path).exists():
            artifact.provenance = record_path(artifact)
    summary = summary_link(store, report.batch, report.result) if report.result else None
    present = {n for n in JOB_FILES if (workdir / n).exists()} | {"report.json", "report.md"}
    markdown, html = job_markdown(report), job_html(report, summary, present)
    report.timings["reports"] = round(time.perf_counter() - start, 4)  # report.json itself comes last
    (workdir / "report.md").write_text(markdown)
    (workdir / "report.html").write_text(html)
    (workdir / REPORT_FILE).write_text(report.model_dump_json(indent=2) + "\n")
    write_records(spec, report, workdir, store)


def _seconds_between(earlier: str, later: str | None) -> float | None:
    from datetime import datetime

    try:
        return round((datetime.fromisoformat(later or "") - datetime.fromisoformat(earlier)).total_seconds(), 3)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------- the work


def _run_planned(item: Planned, spec: JobSpec, store: Store, workdir: Path, evidence: SourceEvidence,
                 model: LoadedModel | None, made: dict[str, ArtifactReport], isolation: Isolation,
                 on_step: Callable[[str], None]) -> ArtifactReport:
    """One planned artifact: skipped with its reason, failed on its options, or its step's report."""
    from portq.tasks.execution.steps import StepContext, new_report, run_artifact
    from portq.tasks.formats import FORMATS
    from portq.tasks.formats.selection import variant_of

    request = item.request
    handler = FORMATS.get(request.format.value)
    # decided here: no child process, no model rebuild, for an artifact that cannot run
    reason = item.skip or handler.unsupported(spec.target)
    if reason:
        return _labelled(new_report(request, StepStatus.skipped, reason), item)
    try:
        resolved = handler.resolve(request)
    except PortqError as e:
        return _labelled(new_report(request, error=e.at(file=spec.display).message), item)
    variant = variant_of(request)
    base = None
    if variant.base is not None:
        fmt = request.format.value
        base = made.get(fmt if variant.base == "default" else f"{fmt}.{variant.base}")
    ctx = StepContext(spec=spec, request=request, options=resolved.options, evidence=evidence,
                      out_dir=workdir / request.id, store=store, source=model,
                      base_file=workdir / base.path if base and base.path else None,
                      base_route=base.route if base else None, requested_by=item.requested_by,
                      on_phase=progress(on_step))
    # the isolation may run the step in a child process (a crash costs one artifact)
    return _labelled(isolation.run_step(run_artifact, ctx), item)


def _step_time(artifact: ArtifactReport, seconds: float) -> None:
    """The whole step as the job saw it, and what was not the step's own work (a child's start, the source's
    rebuild in it, the report's trip back)."""
    if artifact.status is StepStatus.skipped and not artifact.timings:
        return
    own = sum(artifact.timings.values())
    artifact.timings["step"] = round(seconds, 4)
    artifact.timings["isolation"] = round(max(seconds - own, 0.0), 4)


def _labelled(artifact: ArtifactReport, item: Planned) -> ArtifactReport:
    """Say why the artifact is in the job (asked for, an --optimize candidate, a base, a repair)."""
    artifact.requested_by = item.requested_by
    return artifact


def _repair_for(item: Planned, artifact: ArtifactReport, spec: JobSpec) -> Planned | None:
    """A half-precision variant that failed parity gets its mixed-precision repair tried too (--optimize)."""
    from portq.tasks.core.contract import ArtifactRequest
    from portq.tasks.formats.selection import Planned, variant_of

    optimize = spec.options.optimize
    if optimize is None or not optimize.repair or artifact.parity is None or artifact.parity.passed:
        return None
    variant = variant_of(item.request)
    if variant.repair is None:
        return None
    return Planned(ArtifactRequest(format=item.request.format, variant=variant.repair),
                   requested_by=f"repair of {artifact.id}")


def _convert(spec: JobSpec, store: Store, workdir: Path, report: JobReport, isolation: Isolation,
             on_step: Callable[[str], None]) -> None:
    from portq.tasks.execution.timings import Stopwatch
    from portq.tasks.formats.reproduce import write_inputs
    from portq.tasks.formats.search import prune_reason
    from portq.tasks.formats.selection import plan
    from portq.tasks.reports.content import mark_best, no_pick_note

    clock = Stopwatch()
    report.timings = clock.stages  # filled in as the job goes: a failure still shows where the time went
    # built, given inputs, run and timed where the steps run (a step process, which keeps the model for them)
    source = isolation.source(spec, store, workdir, clock, progress(on_step))
    evidence, model = source.evidence, source.model
    report.notes = source.notes
    report.inputs = source.inputs
    report.environment = evidence.environment
    for name, section in source.sections.items():  # the kind's own (fuse: how the model fused, against its members)
        setattr(report, name, section)
    # once per job, into the result folder: every artifact's reproduce script reads these samples
    write_inputs(workdir, evidence.samples)
    made: dict[str, ArtifactReport] = {}  # artifacts made so far, by id (an optimization's base)
    queue = plan(spec.options, spec.target.value, evidence.source_kind or None)
    auto = spec.options.optimize is not None and "auto" in spec.options.optimize.candidates
    while queue:
        item = queue.pop(0)
        step_start = time.perf_counter()
        pruned = prune_reason(item.request, {a.id: a for a in report.artifacts}) \
            if auto and item.requested_by == "optimize" and item.skip is None else None
        if pruned is not None:  # its family cannot win: recorded, not made
            from portq.tasks.execution.steps import new_report

            artifact = _labelled(new_report(item.request, StepStatus.skipped, pruned), item)
            artifact.pruned = True
        else:
            artifact = _run_planned(item, spec, store, workdir, evidence, model, made, isolation, on_step)
        _step_time(artifact, time.perf_counter() - step_start)
        clock.add("artifacts", time.perf_counter() - step_start)
        report.artifacts.append(artifact)
        if artifact.status is StepStatus.succeeded and artifact.path:
            made[artifact.id] = artifact
        repair = _repair_for(item, artifact, spec)
        if repair is not None and all(p.id != repair.id for p in queue) and not report.artifact(repair.id):
            queue.insert(0, repair)
    report.best = mark_best(report.artifacts)
    report.best_note = no_pick_note(report.artifacts)
