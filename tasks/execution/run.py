"""Running one admitted job: build its source, gather the evidence, then each artifact's step; the job's
error boundary.

`run_job` never raises for a job's own failure: whatever goes wrong is recorded, with its step, file and
cause, in the job's report and state record, and the caller (a Celery task, or the embedded runner)
carries on. Only `TransientError` (storage trouble) escapes, so the queue can retry it. Whether a
delivery runs at all is decided before, by `portq.tasks.state.delivery.admit`, for the queue and the
embedded default alike.

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
from portq.tasks.core.errors import PortqError, StoreError, TransientError, first_line
from portq.tasks.core.toolchain import toolchain, worker_name
from portq.tasks.execution.capture import captured
from portq.tasks.execution.isolation import InProcess, Isolation
from portq.tasks.state import records
from portq.tasks.state.store import Store, result_key

REPORT_FILE = "report.json"
LOG_FILE = "job.log"


def workdir_prefix(job_id: str) -> str:
    """A job's working folder (in the system temp dir) starts with this; `workdir_glob` finds leftovers."""
    return f"portq-job-{job_id}-"


def workdir_glob(job_id: str = "*") -> str:
    """Working folders of one job (or of all jobs) that a killed process could not remove."""
    return os.path.join(tempfile.gettempdir(), workdir_prefix(job_id) + "*")


def failed_key(job_id: str) -> str:
    return f"failed/{job_id}"


def run_job(spec: JobSpec, store: Store, *, worker: str | None = None, isolation: Isolation | None = None) -> JobReport:
    """Run (or serve from the cache) one job and record its outcome.

    `isolation` runs each artifact's step; the default runs them here.
    """
    worker = worker or worker_name()
    try:
        record = records.read_record(store, spec.batch_id, spec.job_id)
    except StoreError as e:
        raise TransientError(e.cause, step="store") from e
    fresh = record is None
    record = record or records.new_record(spec)
    tools = toolchain()
    key = spec.job_key(tools)
    cache = result_key(key)

    if not spec.force and store.exists(f"{cache}/{REPORT_FILE}"):
        report = read_versioned(JobReport, store.read_json(f"{cache}/{REPORT_FILE}"), store.url(cache))
        if report.status is JobStatus.succeeded:
            records.transition(store, record, JobStatus.succeeded, fresh=fresh, result=cache, cached=True)
            return report.model_copy(update={"cached": True, "job_id": spec.job_id, "batch": spec.batch_id,
                                             "model": spec.model})

    records.transition(store, record, JobStatus.running, fresh=fresh, worker=worker, step="load")
    report = JobReport(job_id=spec.job_id, job_key=key, kind=spec.kind, batch=spec.batch_id, model=spec.model,
                       source=spec.display, target=spec.target, status=JobStatus.running, toolchain=tools,
                       worker=worker, started_at=utcnow(), trust_pickle=getattr(spec.source, "trust_pickle", False))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=workdir_prefix(spec.job_id)) as tmp:
        workdir = Path(tmp)
        try:
            with captured(workdir / LOG_FILE):
                _convert(spec, store, workdir, report, isolation or InProcess(),
                         on_step=lambda step: records.note_step(store, record, step))
        except TransientError:
            raise
        except PortqError as e:
            _fail(report, e.at(file=spec.display))
        except Exception as e:  # a bug in portq or a library: still a recorded failure, never a dead worker
            _fail(report, PortqError(f"internal error: {type(e).__name__}: {first_line(e)}", step="job",
                                     file=spec.display, hint="please report this with the job's report.json"))
            report.inputs.append({"traceback": traceback.format_exc(limit=8)})
        if report.status is JobStatus.running:
            bad = [a for a in report.artifacts if a.status is StepStatus.failed or (a.parity and not a.parity.passed)]
            report.status = JobStatus.failed if bad else JobStatus.succeeded
            if bad:
                report.error = "; ".join(_artifact_problem(a) for a in bad)
        if report.status is JobStatus.succeeded:
            final = cache if not spec.force else f"{cache}-{spec.job_id}"
        else:
            final = failed_key(spec.job_id)
        report.result = store.url(final)
        report.finished_at = utcnow()
        report.duration_s = round(time.perf_counter() - start, 3)
        _write_reports(workdir, report)
        try:
            store.publish_dir(workdir, final, commit_file=REPORT_FILE)
        except (StoreError, OSError) as e:
            raise TransientError(f"cannot publish results: {e}", step="publish") from e
    records.transition(store, record, report.status, result=final, cached=False, error=report.error)
    return report


#: step phases worth a write of the job's record (opening a session is over in a moment)
PROGRESS_PHASES = ("export", "parity", "latency", "localise")


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


def _fail(report: JobReport, e: PortqError) -> None:
    report.status = JobStatus.failed
    report.error = e.message
    report.failure = Failure(**e.to_dict())  # type: ignore[arg-type]


def _write_reports(workdir: Path, report: JobReport) -> None:
    from portq.tasks.reports.content import job_markdown
    from portq.tasks.reports.html import job_html

    (workdir / "report.md").write_text(job_markdown(report))
    (workdir / "report.html").write_text(job_html(report))
    (workdir / REPORT_FILE).write_text(report.model_dump_json(indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- the work


def _convert(spec: JobSpec, store: Store, workdir: Path, report: JobReport, isolation: Isolation,
             on_step: Callable[[str], None]) -> None:
    from portq.tasks.checks.runners import torch_device
    from portq.tasks.execution.source_run import gather_evidence, resolve_inputs
    from portq.tasks.execution.steps import StepContext, new_report, run_artifact
    from portq.tasks.formats import FORMATS
    from portq.tasks.formats.reproduce import write_inputs
    from portq.tasks.reports.content import mark_best
    from portq.tasks.sources.builders import build_source

    device = torch_device(spec.target)
    model = build_source(spec, store)
    report.notes = list(model.notes)
    sig = resolve_inputs(spec, store, model)
    report.inputs = sig.describe()
    on_step("source")  # the source model runs on every sample and is timed
    evidence = gather_evidence(spec, model, sig, device)
    report.environment = evidence.environment
    # once per job, into the result folder: every artifact's reproduce script reads these samples
    write_inputs(workdir, evidence.samples)
    for request in spec.options.artifacts:
        handler = FORMATS.get(request.format.value)
        reason = handler.unsupported(spec.target)
        if reason:  # decided here: no child process, no model rebuild, for a format that cannot run
            report.artifacts.append(new_report(request, StepStatus.skipped, reason))
            continue
        try:
            resolved = handler.resolve(request)
        except PortqError as e:
            report.artifacts.append(new_report(request, error=e.at(file=spec.display).message))
            continue
        ctx = StepContext(spec=spec, request=request, options=resolved.options, evidence=evidence,
                          out_dir=workdir / request.id, store=store, source=model, on_phase=progress(on_step))
        # the isolation may run the step in a child process (a crash costs one artifact)
        report.artifacts.append(isolation.run_step(run_artifact, ctx))
    report.best = mark_best(report.artifacts)
